"""The recovery stage: feeds the algorithms from the calibrated state, layer by layer.

After calibration, ``recover`` runs what ``QuantOptions.recovery`` asks for, in this order:
weight rounding (AdaRound or GPTQ), then bias correction (on the rounded weights). Each
returns ``Edits`` (integer weights, corrected biases) that ``CalibratedModel.assemble`` applies
to every plan that quantizes those weights the same way, so the auto-mixed search, the
collapse guard and analysis all see the recovered model. The float model is not changed.

Rounding works in graph order: a layer's inputs come from the quantized model with every
layer before it already rounded. Layers at the same depth do not feed one another, so one
run of the quantized model (cut after them) gives all their inputs; only one depth's inputs
are held at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator

import numpy as np
from onnx import ModelProto, NodeProto, helper, numpy_helper

from edgequant.algorithms.adaround import AdaRoundOptions, adaround
from edgequant.algorithms.bias_correction import BiasCorrectionOptions, correct_biases, depth_levels
from edgequant.algorithms.blocks import (
    Block,
    find_blocks,
    learnable_roots,
    reconstruct,
    supported_block,
)
from edgequant.algorithms.cle import channel_minima, equalize, pre_activations
from edgequant.algorithms.gptq import GPTQOptions, gptq_round
from edgequant.algorithms.layer import Layer, supported
from edgequant.algorithms.report import StepReport
from edgequant.algorithms.smoothquant import (
    AlphaSearch,
    activation_rows,
    channel_absmax,
    choose_alphas,
    smooth,
)
from edgequant.calibrated import CalibratedModel, activation_params
from edgequant.data.sources import Sample
from edgequant.planning.options import Recovery
from edgequant.planning.plan import QuantPlan, WeightPlan
from edgequant.quant.params import QuantParams, dequantize_array, quantize_array
from edgequant.runtime.capture import capture, truncated
from edgequant.transform.qdq import Edits, insert_qdq, plain_weight, range_key, weight_key

Progress = Callable[[str, int, int], None]
ROUNDED_OPS = ("Conv", "Gemm", "MatMul")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
#: Layers GPTQ aims at the float output for (``gptq_float_target``). Not MatMul: on MiniLM's
#: MatMul layers the float target lowers each layer's MSE (−24 to −41 %) yet breaks the model
#: (int8 nearest-centroid top-1 0.83 → 0.62-0.65, also with the attention projections left
#: out); the least-squares answer on noisy inputs shrinks outputs towards their mean, which
#: LayerNorm and attention downstream do not forgive. They round against their float weight.
FLOAT_TARGET_OPS = ("Conv", "Gemm") + RECURRENT_OPS
#: λ of block reconstruction, whose two terms are both normalised (``algorithms.blocks``): on a
#: random Conv-Relu-Pool-Conv-HardSwish-Gemm chain at W4 per tensor, 1000 steps, the block MSE
#: fell −4 % with 0.01, −47 % with 0.1 and −82 % with 1.
BLOCK_REG_WEIGHT = 1.0
#: Calibration samples whose rows SmoothQuant's α search (``smoothquant="auto"``) tries α on.
ALPHA_SAMPLES = 16


def equalize_before(model: ModelProto, samples: Callable[[], Iterator[Sample]], rec: Recovery,
                    search: AlphaSearch | None = None) -> list[StepReport]:
    """SmoothQuant, then cross-layer equalization, on the prepared float model in place (before
    calibration: both rescale activations). ``samples()`` gives the calibration samples their
    statistics are measured on (SmoothQuant's channel maxima, CLE's bias-absorption bounds)."""
    reports = []
    if rec.smoothquant is not None:
        started = time.perf_counter()
        tensors = smoothable(model)
        absmax = channel_absmax(model, tensors, samples())
        alpha: float | dict = float(rec.smoothquant) if rec.smoothquant != "auto" else \
            choose_alphas(model, activation_rows(model, tensors, itertools.islice(samples(), ALPHA_SAMPLES)), absmax,
                          search or AlphaSearch())
        sm = smooth(model, absmax, alpha)
        title = f"SmoothQuant (α {rec.smoothquant:g})" if not isinstance(alpha, dict) else "SmoothQuant (α auto)"
        detail = f"{len(sm.activations)} activations, {len(sm.inserted)} Mul inserted"
        if isinstance(alpha, dict):
            chosen = sorted(v for v in alpha.values() if v is not None)
            detail += (f"; α per activation {chosen[0]:g}–{chosen[-1]:g}, mean {np.mean(chosen):.2f}" if chosen else "")
            detail += f"; {sum(v is None for v in alpha.values())} left as they are (smoothing did not help)"
        reports.append(StepReport(title, len(sm.layers), "activation channel max/min", sm.flatness_before,
                                  sm.flatness_after, time.perf_counter() - started, detail))
    if rec.cle:
        started = time.perf_counter()
        tensors = pre_activations(model, rec.cle_relu6)
        minima = channel_minima(model, tensors, samples()) if tensors else {}
        cle = equalize(model, relu6=rec.cle_relu6, absorb_bias=bool(tensors), minima=minima)
        detail = f"{cle.iterations} sweeps, {cle.biases_absorbed} biases absorbed"
        if cle.activations_bounded:
            detail += f", {len(cle.activations_bounded)} ReLU6 bounded per channel (Relu + Min)"
        if cle.activations_replaced:
            detail += f", {len(cle.activations_replaced)} ReLU6 → Relu (the float model changes there)"
        reports.append(StepReport("CLE", len(cle.pairs), "weight channel range max/min", cle.range_ratio_before,
                                  cle.range_ratio_after, time.perf_counter() - started, detail, "pairs"))
    return reports


def smoothable(model: ModelProto) -> list[str]:
    """Activations read as input 0 by a MatMul or Gemm with a constant float weight."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits \
                and node.input[0] not in inits:
            out.append(node.input[0])
    return list(dict.fromkeys(out))


def recover(state: CalibratedModel, progress: Progress | None = None) -> CalibratedModel:
    """``state`` with the edits and reports of the rounding and bias-correction steps asked for."""
    rec = state.options.recovery
    edits, reports = state.edits, list(state.recovery)
    if rec.rounding == "blocks":  # level 2 on level 1: blocks start from GPTQ's rounding and keep it unless beaten
        edits, report = round_weights(state, state.plan, edits, "gptq", progress)
        reports.append(report)
        edits, report = round_blocks(state, state.plan, edits, progress)
        reports.append(report)
    elif rec.rounding:
        edits, report = round_weights(state, state.plan, edits, rec.rounding, progress)
        reports.append(report)
    if rec.bias:
        count = min(rec.bias_correction_data_count, state.split.calibration)
        edits, report = correct_biases(state.model, state.plan, state.params(state.plan, edits), edits,
                                       lambda: state.samples(0, count),
                                       BiasCorrectionOptions(rec.bias, count), state.options.device, progress)
        reports.append(report)
    return dataclasses.replace(state, edits=edits, recovery=tuple(reports))


@dataclasses.dataclass(frozen=True)
class _Rounded:
    """A layer whose weights are rounded: ``weights`` maps an input slot to its WeightPlan
    (slot 1 for Conv/Gemm/MatMul; 1 = W and 2 = R for a recurrent op)."""

    node: NodeProto
    weights: dict[int, WeightPlan]

    @property
    def recurrent(self) -> bool:
        return self.node.op_type in RECURRENT_OPS


def _recurrent_slots(node: NodeProto) -> tuple[int, ...]:
    """The weights of a recurrent op that are linear maps of what the graph shows: W (on the
    input sequence) always; R (on the previous hidden state, read from the output ``Y``) for
    LSTM and RNN, and GRU with ``linear_before_reset`` (otherwise R reads ``r ⊙ h``); neither
    with ``sequence_lens`` (padded steps are not in ``Y``'s order)."""
    if len(node.input) > 4 and node.input[4]:
        return ()
    if node.op_type == "GRU" and not _attrs(node).get("linear_before_reset", 0):
        return (1,)
    return (1, 2)


def rounding_layers(state: CalibratedModel, plan: QuantPlan) -> list[_Rounded]:
    """Conv/Gemm/MatMul layers whose weight (input 1) the plan quantizes, and LSTM/GRU/RNN
    layers whose W (and R) it quantizes, in graph order."""
    out = []
    for node in state.model.graph.node:
        planned = plan.weights.get(node.name, {})
        if node.op_type in ROUNDED_OPS and planned.get(1) is not None and supported(node):
            out.append(_Rounded(node, {1: planned[1]}))
        elif node.op_type in RECURRENT_OPS:
            slots = {k: planned[k] for k in _recurrent_slots(node) if planned.get(k) is not None}
            if slots:
                out.append(_Rounded(node, slots))
    return out


def round_weights(state: CalibratedModel, plan: QuantPlan, edits: Edits, algorithm: str,
                  progress: Progress | None = None) -> tuple[Edits, StepReport]:
    """Integer weights chosen by ``algorithm`` (``adaround`` or ``gptq``) for every layer of
    ``rounding_layers``, depth by depth; the report compares each layer's output MSE on its
    inputs against round to nearest."""
    started = time.perf_counter()
    rec = state.options.recovery
    count = min(rec.adaround_data_count if algorithm == "adaround" else rec.hessian_opt_data_count,
                state.split.calibration)
    layers = rounding_layers(state, plan)
    inits = {t.name: t for t in state.model.graph.initializer}
    params = state.params(plan, edits)
    chosen: dict = dict(edits.weights)
    before, after, done = [], [], 0
    for level in depth_levels(state.model, layers):
        qmodel = insert_qdq(state.model, plan, params, Edits(chosen, edits.biases, edits.ranges))
        by_name = {n.name: n for n in qmodel.graph.node}
        q_names = [_read(by_name[lay.node.name], lay.recurrent) for lay in level]
        f_names = [_read(lay.node, lay.recurrent) for lay in level]
        q_all = list(dict.fromkeys(n for names in q_names for n in names))
        quantized = capture(truncated(qmodel, q_all), q_all, state.samples(0, count), state.options.device)
        floats = capture(state.model, list(dict.fromkeys(n for names in f_names for n in names)),
                         state.samples(0, count), state.options.device)
        for lay, qn, fn in zip(level, q_names, f_names):
            for slot, wp in lay.weights.items():
                w = numpy_helper.to_array(inits[wp.tensor]).astype(np.float32)
                _, p = plain_weight(w, wp)
                if lay.recurrent:
                    q, mse = _round_recurrent(lay.node, slot, w, p, wp, [quantized[n] for n in qn],
                                              [floats[n] for n in fn], algorithm, rec)
                else:
                    q, mse = _round_one(lay.node, w, p, wp, quantized[qn[0]], floats[fn[0]], algorithm, rec)
                if mse[1] < mse[0]:  # else round to nearest stays (a learned rounding may not beat it)
                    chosen[weight_key(wp)] = (q, p)
                before.append(mse[0])
                after.append(min(mse))
            done += 1
            if progress:
                progress(algorithm, done, len(layers))
    name = "AdaRound" if algorithm == "adaround" else "GPTQ"
    ratio = [a / b for a, b in zip(after, before) if b > 0]
    return Edits(chosen, edits.biases, edits.ranges), StepReport(
        name, len(layers), "layer MSE", 1.0 if ratio else 0.0, float(np.mean(ratio)) if ratio else 0.0,
        time.perf_counter() - started, f"{count} samples")


@dataclasses.dataclass(frozen=True)
class _Head:
    """A block by its first node (what ``depth_levels`` orders)."""

    node: NodeProto
    block: Block


def round_blocks(state: CalibratedModel, plan: QuantPlan, edits: Edits,
                 progress: Progress | None = None) -> tuple[Edits, StepReport]:
    """Block reconstruction (``algorithms.blocks``) of every block of layers, depth by depth,
    starting from the rounding ``edits`` hold (GPTQ's, under ``finetune_level`` 2) or round to
    nearest; a block keeps that where its learned rounding does not lower the block error."""
    started = time.perf_counter()
    rec = state.options.recovery
    count = min(rec.adaround_data_count, state.split.calibration)
    heads = [_Head(b.nodes[0], b) for b in find_blocks(state.model, plan, rec.block_max_layers) if supported_block(b)]
    inits = {t.name: t for t in state.model.graph.initializer}
    params = state.params(plan, edits)
    opts = AdaRoundOptions(steps=rec.adaround_optim_steps, lr=rec.adaround_optim_lr, reg_weight=BLOCK_REG_WEIGHT)
    acts = {a.root: a for a in plan.activations.values()}
    chosen: dict = dict(edits.weights)
    ranges: dict = dict(edits.ranges)
    ratios, layers, done, learned, ran, rejected = [], 0, 0, 0, [], 0
    budget = rec.block_time_budget
    for level in depth_levels(state.model, heads):
        qmodel = insert_qdq(state.model, plan, params, Edits(chosen, edits.biases, ranges))
        by_name = {n.name: n for n in qmodel.graph.node}
        q_in = list(dict.fromkeys(by_name[h.node.name].input[0] for h in level))
        quantized = capture(truncated(qmodel, q_in), q_in, state.samples(0, count), state.options.device)
        outs = list(dict.fromkeys(h.block.output for h in level))
        floats = capture(state.model, outs, state.samples(0, count), state.options.device)
        for head in level:
            block = head.block
            float_w = {n: numpy_helper.to_array(inits[wp.tensor]).astype(np.float32) for n, wp in block.weights.items()}
            floats_w = {n: (w, plain_weight(w, block.weights[n])[1]) for n, w in float_w.items()}
            biases = _block_biases(block, plan, inits, edits)
            x, target = _paired(quantized[by_name[head.node.name].input[0]], floats[block.output])
            fit, held = held_out_split(len(x))
            learn = tuple(learnable_roots(block, plan, state.options.unsigned_nonnegative)) \
                if rec.block_learn_activations else ()
            share = None if budget is None else \
                max(0.0, budget - (time.perf_counter() - started)) / (len(heads) - done)
            start = {n: edits.weights[weight_key(wp)][0] for n, wp in block.weights.items()
                     if weight_key(wp) in edits.weights}  # a rounding already chosen (GPTQ's): start from it
            ints, stats = reconstruct(block, state.model, plan, params, floats_w, biases, x[fit], target[fit], opts,
                                      rec.block_batch_size, learn=learn, act_lr=rec.block_activation_lr,
                                      seconds=share, start=start,
                                      held=(x[held], target[held]) if held.size else None)
            ran.append(stats.optim_steps)
            rejected += stats.mse_after < stats.mse_before and not stats.improved
            if stats.improved:
                for n, wp in block.weights.items():
                    chosen[weight_key(wp)] = (ints[n], floats_w[n][1])
                for root, step in stats.steps.items():
                    act = acts[root]
                    ranges[range_key(act)] = step_range(params[root], act.symmetric, step)
                    params[root] = activation_params(ranges[range_key(act)], act, state.options.unsigned_nonnegative)
                    learned += 1
            ratios.append(stats.ratio)
            layers += len(block.weights)
            done += 1
            if progress:  # the stage, then after " · " how far the blocks' error has come down
                progress(f"block reconstruction · block MSE {float(np.mean(ratios)) - 1:+.0%}", done, len(heads))
    detail = f"{len(heads)} blocks, {count} samples" + (f", {learned} activation step sizes learned" if learned else "")
    if rejected:
        detail += f"; {rejected} block{'s' if rejected > 1 else ''} kept {'their' if rejected > 1 else 'its'} first rounding: " \
                  "the learned one was worse on held-out samples"
    if ran and min(ran) < opts.steps:
        detail += f"; time budget {budget:g} s: {min(ran)}–{max(ran)} steps a block"
    return Edits(chosen, edits.biases, ranges), StepReport(
        "block reconstruction", layers, "block MSE (held-out samples)", 1.0 if ratios else 0.0, float(np.mean(ratios)) if ratios else 0.0,
        time.perf_counter() - started, detail)


#: Every ``HELD_OUT``-th sample of a block's inputs is held out of its learning: a block keeps
#: its learned rounding (and step sizes) only where they lower its error on those samples too.
#: Fitted on all 64 samples, EfficientNet-Lite0's blocks at W4A8 each lowered their own error,
#: yet the model's output cosine fell from 0.962 (GPTQ + bias correction) to 0.933.
HELD_OUT = 4
#: Blocks with fewer samples than this learn from all of them (too few to hold any out).
MIN_HELD_OUT_SAMPLES = 8


def held_out_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the samples a block learns from and of those held out (every ``HELD_OUT``-th,
    the 4th, 8th …); none held out below ``MIN_HELD_OUT_SAMPLES``.

    Example: 8 → ([0, 1, 2, 4, 5, 6], [3, 7])."""
    everything = np.arange(n)
    if n < MIN_HELD_OUT_SAMPLES:
        return everything, everything[:0]
    held = everything[HELD_OUT - 1::HELD_OUT]
    return np.setdiff1d(everything, held), held


def step_range(p: QuantParams, symmetric: bool, step: float) -> tuple[float, float]:
    """The range whose params (``compute_params``) are step ``step`` with ``p``'s zero point.

    Example: uint8 with zero point 10 and step 0.1 → (−1.0, 24.5)."""
    if symmetric:
        half = p.dtype.qmax if p.dtype.signed else (p.dtype.qmax - p.dtype.qmin) / 2.0
        return -half * step, half * step
    z = float(np.asarray(p.zero_point))
    return (p.dtype.qmin - z) * step, (p.dtype.qmax - z) * step


def _block_biases(block: Block, plan: QuantPlan, inits: dict, edits: Edits) -> dict[str, np.ndarray]:
    """Float bias of each weighted node of ``block`` that has one (a corrected one if given)."""
    out = {}
    for node in block.nodes:
        if node.name not in block.weights or len(node.input) < 3 or node.input[2] not in inits:
            continue
        wp = block.weights[node.name]
        out[node.name] = edits.biases.get((node.input[2], weight_key(wp)), numpy_helper.to_array(inits[node.input[2]]))
    return out


def _attrs(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _read(node: NodeProto, recurrent: bool) -> list[str]:
    """The tensors a layer's rounding reads: its input; a recurrent op's input and output Y
    (the hidden states that R multiplies)."""
    return [node.input[0], node.output[0]] if recurrent else [node.input[0]]


def _recurrent_rows(node: NodeProto, slot: int, x: list[np.ndarray], y: list[np.ndarray],
                    direction: int) -> np.ndarray:
    """What weight ``slot`` of direction ``direction`` multiplies, as rows [R, K]: every
    step's input for W (the same for every direction); for R, the hidden state each step
    reads, ``Y`` of the step before in the direction's order (the first step's initial state
    is left out). ``x``/``y`` per sample in the node's ``layout``."""
    batch_first = bool(_attrs(node).get("layout", 0))
    if slot == 1:
        return np.concatenate([a.reshape(-1, a.shape[-1]) for a in x])
    rows = []
    reverse = _directions(node)[direction] == "reverse"
    for a in y:
        a = a.transpose(1, 2, 0, 3) if batch_first else a  # [T, D, B, H]
        steps = a[1:, direction] if reverse else a[:-1, direction]
        rows.append(steps.reshape(-1, a.shape[-1]))
    return np.concatenate(rows)


def _directions(node: NodeProto) -> tuple[str, ...]:
    mode = _attrs(node).get("direction", b"forward")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return ("forward", "reverse") if mode == "bidirectional" else (mode,)


def _round_recurrent(node, slot, w, p, wp, q_vals: list[list[np.ndarray]], f_vals: list[list[np.ndarray]],
                     algorithm: str, rec):
    """``_round_one`` for weight ``slot`` of a recurrent op, direction by direction: each
    direction's [gates·H, K] matrix is a Gemm (transB) on the rows ``_recurrent_rows`` gives,
    quantized model's rows against the float model's."""
    ints, before, after = [], 0.0, 0.0
    for d in range(w.shape[0]):
        # the direction's params: the same per-gate-channel scales (axis 1 of [D, G·H, K])
        pd = QuantParams(p.scale, p.zero_point, p.dtype, 0 if p.axis is not None else None)
        xq = _recurrent_rows(node, slot, q_vals[0], q_vals[1], d)
        xf = _recurrent_rows(node, slot, f_vals[0], f_vals[1], d)
        q, mse = _round_matrix(Layer("Gemm", w[d], {"transB": 1}), w[d], pd, wp, xq, xf, algorithm, rec,
                               rec.gptq_float_target)
        ints.append(q)
        before, after = before + mse[0], after + mse[1]
    return np.stack(ints).astype(p.dtype.np_dtype), (before, after)


def _round_one(node, w, p, wp, x_q: list[np.ndarray], x_f: list[np.ndarray], algorithm: str, rec):
    """(integer weight, (MSE of round to nearest, MSE after)) of one layer on its inputs."""
    layer = Layer(node.op_type, w, _attrs(node))
    return _round_matrix(layer, w, p, wp, _stack(x_q, node.op_type), _stack(x_f, node.op_type), algorithm, rec,
                         rec.gptq_float_target and node.op_type in FLOAT_TARGET_OPS)


def _round_matrix(layer: Layer, w, p, wp, xq: np.ndarray, xf: np.ndarray, algorithm: str, rec, aim: bool):
    """``_round_one`` on stacked inputs (quantized model's, float model's); ``aim``: GPTQ's
    float target."""
    if algorithm == "adaround":
        target = layer.forward(xf)
        opts = AdaRoundOptions(steps=rec.adaround_optim_steps, batch_size=rec.adaround_batch_size,
                               lr=rec.adaround_optim_lr, data_count=rec.adaround_data_count)
        q, stats = adaround(layer, p, wp.scheme, xq, target, opts)
        return q, (stats.mse_before, stats.mse_after)
    opts_g = GPTQOptions(block_size=rec.hessian_opt_block_size, stability_ratio=rec.hessian_opt_stability_ratio,
                         sort_hessian=rec.hessian_opt_sort_hessian, fast=rec.hessian_opt_use_fast_strategy)
    q = gptq_round(layer, p, wp.scheme, xq, opts_g, xf if aim else None)
    return q, _mse_pair(layer, w, p, wp, q, xq, layer.forward(xf))


def _mse_pair(layer, w, p, wp, q, x, target) -> tuple[float, float]:
    rtn = dequantize_array(quantize_array(w, p, wp.scheme), p)
    got = dequantize_array(q, p)
    return (float(np.mean((layer.forward(x, rtn) - target) ** 2)),
            float(np.mean((layer.forward(x, got) - target) ** 2)))


def _paired(inputs: list[np.ndarray], outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The samples whose input has the most common shape (dynamic widths), stacked, with their
    outputs: the same samples on both sides."""
    shapes = [a.shape[1:] for a in inputs]
    common = max(sorted(set(shapes)), key=shapes.count)
    keep = [i for i, s in enumerate(shapes) if s == common]
    return np.concatenate([inputs[i] for i in keep]), np.concatenate([outputs[i] for i in keep])


def _stack(arrays: list[np.ndarray], op_type: str) -> np.ndarray:
    """One array of the samples' values along axis 0: MatMul/Gemm inputs as rows of their last
    axis (any sequence lengths); Conv inputs cropped to the smallest spatial size among them
    (dynamic widths: every sample counts, only the widest ones lose their right edge)."""
    if op_type != "Conv":
        return np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays])
    least = tuple(min(a.shape[k] for a in arrays) for k in range(2, arrays[0].ndim))
    window = (slice(None), slice(None)) + tuple(slice(0, n) for n in least)
    return np.concatenate([a[window] for a in arrays])
