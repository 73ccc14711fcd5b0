"""Bias correction: remove the mean output error that quantization leaves in each layer.

A quantized layer computes ``y_q = W_q·x_q + b`` where the float model computes
``y = W·x + b``. Rounding errors rarely average to zero per output channel, and the shift
``E[y_q − y]`` passes through every layer after it (Nagel et al. 2019, §4.2). Subtracting it
from the bias, ``b' = b − E[y_q − y]``, removes it.

Two forms:

* **empirical**: ``E[y_q − y]`` is measured per output channel on calibration samples, in the
  quantized model with every upstream layer quantized and already corrected (graph order).
  Layers at the same depth (the most bias layers on any path from the inputs) do not feed each
  other, so one run of the quantized model, cut after them, measures all of them: a chain of
  ``L`` layers takes ``L`` runs, a wide graph fewer. One more run measures what is left.
  (Correcting every layer from one run instead counts an upstream error twice, once where it
  arises and once downstream: on the MNIST CNN under ``espdl-s3`` that made the last
  layer's error 3× worse, not better.)
* **fast** (NNCF's default): only the layer's own weight rounding, on the float input's channel
  means: ``E[y_q − y] ≈ (W_q − W)·E[x]``, summed over each kernel window (zero padding is
  ignored). It needs one run of the float model and no quantized one.

Example (one channel): W = [0.30], W_q = [0.25], E[x] = 2 → shift −0.1, so b' = b + 0.1.

The layers are Conv, ConvTranspose and Gemm with a bias input, and MatMul followed by an Add of
a constant (how exporters write a Linear layer, ``x·W + b``): there the Add's output is
measured (with the MatMul output's own quantization where the target has one before the Add:
the bias offsets its mean too), channels on the last axis, by a trimmed mean (``TRIM``), and
the Add's constant is corrected. Where the plan
quantizes that constant (as a constant operand of the Add), it is quantized from its corrected
values, so its range follows the correction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from onnx import ModelProto, NodeProto, helper, numpy_helper

from edgequant.algorithms.report import StepReport
from edgequant.planning.plan import QuantPlan, WeightPlan
from edgequant.quant.params import dequantize_array
from edgequant.runtime.capture import channel_means, truncated
from edgequant.runtime.feed import run_in_place
from edgequant.runtime.session import make_session
from edgequant.transform.qdq import Edits, insert_qdq, matmul_biases, plain_weight, weight_key

Progress = Callable[[str, int, int], None]
L = TypeVar("L")  # anything with a ``node`` (NodeProto)
SUPPORTED = ("Conv", "ConvTranspose", "Gemm")
#: A channel's mean error is taken from at least this many values, or not corrected: after a
#: global pooling a channel has one value per sample, and from 32 samples the estimate is as
#: much noise as error (PP-LCNet at W4: its SE blocks and last Conv, corrected from 32 values
#: each, took the output cosine from 0.998 to 0.906).
MIN_VALUES = 256
#: A MatMul layer's channel error is the mean of the values between these quantiles (trimmed
#: mean), from at most ``TRIM_PER_SAMPLE`` evenly spaced positions of each sample. Transformers
#: put huge values on a few tokens of a few channels (attention sinks), and their errors there
#: made the plain mean: on MiniLM the correction then shifted every other token, output cosine
#: 0.84 → 0.32; the trimmed mean gives 0.86 (round to nearest 0.84).
TRIM = 0.1
TRIM_PER_SAMPLE = 256


@dataclass(frozen=True)
class BiasCorrectionOptions:
    """``form``: ``empirical`` or ``fast``; ``data_count``: calibration samples measured
    (NeuroPilot ``bias_correction_data_count``)."""

    form: str = "empirical"
    data_count: int = 64


@dataclass(frozen=True)
class _Layer:
    """``node``'s output is measured and corrected through the bias ``bias``; ``compute`` is the
    layer whose weight makes the error (``node`` itself, or the MatMul before a bias Add);
    ``axis``: the output's channel axis."""

    node: NodeProto
    bias: str
    weight: WeightPlan
    compute: NodeProto
    axis: int = 1

    @property
    def key(self) -> tuple:
        return (self.bias, weight_key(self.weight))


def bias_layers(model: ModelProto, plan: QuantPlan) -> list[_Layer]:
    """The layers whose int32 bias the plan quantizes (Conv, ConvTranspose, Gemm), and the
    MatMuls whose bias is the constant of the Add after them (``matmul_biases``; measured at the
    Add's output, channels on the last axis), in graph order."""
    adds = matmul_biases(model, plan)
    out = []
    for node in model.graph.node:
        if node.name in adds:
            mb = adds[node.name]
            out.append(_Layer(node, mb.tensor, mb.weight, mb.matmul, -1))
        if node.op_type not in SUPPORTED or node.name not in plan.biases:
            continue
        for bp in plan.biases[node.name].values():
            out.append(_Layer(node, bp.tensor, bp.weight, node))
    return out


def add_zero_biases(model: ModelProto) -> int:
    """Give every Conv and Gemm with a constant weight and no bias a zero bias (the float model
    computes the same), so that bias correction has a bias to correct; returns how many."""
    inits = {t.name: t for t in model.graph.initializer}
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    added = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) > 2 or node.input[1] not in inits:
            continue
        dims = inits[node.input[1]].dims
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        channels = dims[0] if node.op_type == "Conv" or trans_b else dims[-1]
        name, k = f"{node.name}_bias", 1
        while name in taken:
            name, k = f"{node.name}_bias_{k}", k + 1
        taken.add(name)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(channels, np.float32), name))
        node.input.append(name)
        added += 1
    return added


def correct_biases(model: ModelProto, plan: QuantPlan, params: dict, edits: Edits, samples: Callable,
                   options: BiasCorrectionOptions, device: str = "cpu",
                   progress: Progress | None = None) -> tuple[Edits, StepReport]:
    """Edits with corrected biases for every layer of ``bias_layers`` (``edits``' own kept).

    ``samples()`` gives a fresh iterator over the calibration samples to measure on;
    ``params`` are the activation parameters of ``plan``.
    """
    started = time.perf_counter()
    layers = bias_layers(model, plan)
    inits = {t.name: t for t in model.graph.initializer}
    biases = {lay.key: _bias(edits, lay, inits) for lay in layers}
    if not layers:
        return edits, StepReport("bias correction", 0, "mean |channel error|", 0.0, 0.0, 0.0)
    if options.form == "fast":
        errors = _fast_errors(model, layers, inits, edits, samples, device)
        for lay in layers:
            biases[lay.key] = (biases[lay.key] - errors[lay.key]).astype(np.float32)
        return edits.merged(Edits({}, biases)), StepReport(
            "bias correction (fast)", len(layers), "", 0.0, 0.0, time.perf_counter() - started,
            f"weight rounding's mean shift {_mean_abs(errors):.3g} removed, estimated on float input means")
    active = _active_regions(model, layers)
    levels = depth_levels(model, layers)
    first: dict = {}
    for k, level in enumerate(levels):
        if progress:
            progress("bias correction", k, len(levels))
        errors = _measured_errors(model, plan, params, edits.merged(Edits({}, biases)), level, active,
                                  samples, device)
        for lay in level:
            first[lay.key] = errors[lay.key]
            biases[lay.key] = (biases[lay.key] - errors[lay.key]).astype(np.float32)
    if progress:
        progress("bias correction", len(levels), len(levels))
    left = _measured_errors(model, plan, params, edits.merged(Edits({}, biases)), layers, active, samples, device)
    return edits.merged(Edits({}, biases)), StepReport(
        "bias correction", len(layers), "mean |channel error|", _mean_abs(first), _mean_abs(left),
        time.perf_counter() - started, f"{len(levels) + 1} runs of the quantized model")


def depth_levels(model: ModelProto, layers: list[L]) -> list[list[L]]:
    """``layers`` grouped by depth: the most layers of ``layers`` on a path from the graph's
    inputs to the layer's input (layers of one depth never feed one another)."""
    which = {lay.node.name: lay for lay in layers}  # type: ignore[attr-defined]
    depth: dict[str, int] = {}
    groups: dict[int, list[L]] = {}
    for node in model.graph.node:
        d = max((depth.get(i, 0) for i in node.input if i), default=0)
        if node.name in which:
            groups.setdefault(d, []).append(which[node.name])
            d += 1
        for o in node.output:
            depth[o] = d
    return [groups[d] for d in sorted(groups)]


def _bias(edits: Edits, lay: _Layer, inits: dict) -> np.ndarray:
    have = edits.biases.get(lay.key)
    return have.copy() if have is not None else numpy_helper.to_array(inits[lay.bias]).astype(np.float32)


def _mean_abs(errors: dict) -> float:
    return float(np.mean([np.abs(e).mean() for e in errors.values()])) if errors else 0.0


def _measured_errors(model, plan, params, edits, layers, active, samples, device) -> dict:
    """Per layer, the mean over samples of its output in the quantized model minus the float
    one, per channel, where the float output lies in the active region of the activation that
    follows (``_active_regions``). Both models are cut after ``layers``.

    The output is the bias-added one, before its own quantization: a Conv's, or the Add's after
    a MatMul. Where a generic target quantizes the MatMul's output before the Add, that rounding
    and clipping is measured too, and the bias can remove its mean (PP-OCRv4, default int8:
    0.98 of exact lines corrected so, 0.87 measured at the MatMul's output; plain 0.86)."""
    inits = {t.name: t for t in model.graph.initializer}
    qmodel = insert_qdq(model, plan, params, edits)
    by_name = {n.name: n for n in qmodel.graph.node}
    q_out = [by_name[lay.node.name].output[0] for lay in layers]
    f_out = [lay.node.output[0] for lay in layers]
    cut = ModelProto()
    cut.CopyFrom(model)
    q_sess = make_session(truncated(qmodel, list(dict.fromkeys(q_out))), device=device)
    f_sess = make_session(truncated(cut, list(dict.fromkeys(f_out))), device=device)
    sums = [np.zeros(0)] * len(layers)
    counts = [np.zeros(0)] * len(layers)
    kept: list[list[np.ndarray]] = [[] for _ in layers]
    for i, feed in enumerate(samples()):
        got_q = dict(zip(q_out, run_in_place(q_sess, list(dict.fromkeys(q_out)), feed, i)))
        got_f = dict(zip(f_out, run_in_place(f_sess, list(dict.fromkeys(f_out)), feed, i)))
        for k, lay in enumerate(layers):
            f = np.moveaxis(got_f[f_out[k]], lay.axis, 0)
            f = f.reshape(f.shape[0], -1)
            q = np.moveaxis(got_q[q_out[k]], lay.axis, 0).reshape(f.shape)
            lo, hi = active.get(lay.node.name, (-np.inf, np.inf))
            mask = (f > lo) & (f < hi)
            if lay.compute is not lay.node:  # kept for a trimmed mean (``_trimmed_mean``)
                step = -(-f.shape[1] // TRIM_PER_SAMPLE)
                kept[k].append(np.where(mask, q - f, np.nan)[:, ::step].astype(np.float32))
                continue
            diff = np.where(mask, q.astype(np.float64) - f, 0.0).sum(axis=1)
            sums[k] = sums[k] + diff if sums[k].size else diff
            counts[k] = counts[k] + mask.sum(axis=1) if counts[k].size else mask.sum(axis=1).astype(np.float64)
    for k in range(len(layers)):
        if kept[k]:
            sums[k], counts[k] = _trimmed_mean(np.concatenate(kept[k], axis=1))
    return {lay.key: np.divide(sums[k], counts[k], out=np.zeros_like(sums[k]), where=counts[k] >= MIN_VALUES)
            .reshape(inits[lay.bias].dims) for k, lay in enumerate(layers)}


def _trimmed_mean(errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) per channel (row) of the values of ``errors`` (NaN: not measured) between the
    row's ``TRIM`` and ``1 − TRIM`` quantiles: the shift most positions share, not one a few
    outlier values make. Example: errors ``[0.1]·9 + [−5]`` → 0.1 (the mean would be −0.41)."""
    rows, counts = np.zeros(len(errors)), np.zeros(len(errors))
    live = ~np.isnan(errors).all(axis=1)
    if live.any():
        lo, hi = np.nanquantile(errors[live], [TRIM, 1 - TRIM], axis=1, keepdims=True)
        inside = (errors[live] >= lo) & (errors[live] <= hi)
        rows[live] = np.where(inside, errors[live], 0.0).sum(axis=1, dtype=np.float64)
        counts[live] = inside.sum(axis=1)
        counts[live] = np.where((~np.isnan(errors[live])).sum(axis=1) >= MIN_VALUES, counts[live], 0)
    return rows, counts


def _active_regions(model: ModelProto, layers: list[_Layer]) -> dict[str, tuple[float, float]]:
    """Per layer whose output feeds one activation alone, the open interval of pre-activation
    values where that activation is not flat: Relu (0, ∞), Clip (min, max), HardSwish
    (−3, ∞), HardSigmoid (−β/α, (1−β)/α). An error where the activation is flat changes
    nothing downstream, and must not move the bias (PP-LCNet's last Conv, W4: outputs far below
    HardSwish's −3 made the correction collapse the model: cosine 0.96 → 0.46)."""
    readers: dict[str, list[NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name}
    out = {}
    for lay in layers:
        nxt = readers.get(lay.node.output[0], [])
        if len(nxt) == 1 and nxt[0].input[0] == lay.node.output[0]:
            region = _region(nxt[0], inits)
            if region is not None:
                out[lay.node.name] = region
    return out


def _region(node: NodeProto, inits: dict) -> tuple[float, float] | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type == "HardSwish":
        return -3.0, np.inf
    if node.op_type == "HardSigmoid":
        alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        return -beta / alpha, (1.0 - beta) / alpha
    if node.op_type == "Clip":
        bounds = [float(inits[n]) if n in inits else None for n in list(node.input[1:3]) + [""] * 2][:2]
        lo = bounds[0] if bounds[0] is not None else float(attrs.get("min", -np.inf))
        hi = bounds[1] if bounds[1] is not None else float(attrs.get("max", np.inf))
        return lo, hi
    return None


def _fast_errors(model, layers, inits, edits: Edits, samples, device) -> dict:
    """``(W_q − W)·E[x]`` per output channel, for Conv, Gemm and MatMul (ConvTranspose: measured
    as 0), shaped as each bias."""
    inputs = {lay.compute.input[0]: 1 if lay.compute.op_type != "MatMul" else -1 for lay in layers}
    means = channel_means(model, inputs, samples(), device)
    out = {}
    for lay in layers:
        w = numpy_helper.to_array(inits[lay.weight.tensor]).astype(np.float32)
        chosen = edits.weights.get(weight_key(lay.weight))
        wp = lay.weight
        q, p = chosen if chosen is not None else plain_weight(w, wp)
        delta = dequantize_array(q, p).astype(np.float64) - w
        shift = _shift(lay.compute, delta, means[lay.compute.input[0]])
        out[lay.key] = shift.reshape(numpy_helper.to_array(inits[lay.bias]).shape)
    return out


def _shift(node: NodeProto, delta: np.ndarray, mean_x: np.ndarray) -> np.ndarray:
    """``(W_q − W)·E[x]`` for one layer: Conv ``Σ_{c,k} Δ[o, c, k]·E[x_{g(o)·C_g + c}]``;
    Gemm and MatMul ``E[x]·Δ`` (``Δ·E[x]`` with ``transB``)."""
    if node.op_type == "Conv":
        groups = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
        per = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2)  # [O, C/G]
        x = mean_x.reshape(groups, -1)  # [G, C/G]
        g = np.arange(delta.shape[0]) // (delta.shape[0] // groups)
        return np.einsum("oc,oc->o", per, x[g])
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return delta @ mean_x if trans_b else mean_x @ delta
    if node.op_type == "MatMul":  # W: [K, N]
        return mean_x @ delta
    return np.zeros(delta.shape[1], np.float64)
