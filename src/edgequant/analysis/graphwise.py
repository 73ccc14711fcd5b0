"""Graphwise (cumulative) error: the quantized model end to end against float, per tensor.

Both models run on the same samples; every quantized activation of the QDQ model (a
DequantizeLinear output) is compared with the float tensor it stands for, as given by the
``QuantMap``, and the graph outputs are compared by name. Only running sums are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from edgequant.analysis.metrics import FidelityAccumulator, Metrics
from edgequant.analysis.qdq_map import QuantMap
from edgequant.data.sources import Sample
from edgequant.runtime.feed import run_checked
from edgequant.runtime.session import make_session

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TensorError:
    """Error of one tensor of the quantized model against float (``depth``: graph order)."""

    name: str
    quant_name: str
    op_type: str
    node: str
    depth: int
    metrics: Metrics


def tensor_depths(model: ModelProto) -> dict[str, tuple[int, str, str]]:
    """Tensor → (index of its producer in graph order, producer op type, producer name)."""
    out = {i.name: (0, "input", "") for i in model.graph.input}
    for k, node in enumerate(model.graph.node):
        for o in node.output:
            out[o] = (k + 1, node.op_type, node.name)
    return out


def graphwise(float_model: ModelProto, qmodel: ModelProto, qmap: QuantMap, samples: Iterable[Sample],
              count: int, progress: Progress | None = None,
              device: str = "cpu") -> tuple[list[TensorError], list[TensorError]]:
    """(per-tensor errors in graph order, per-output errors)."""
    pairs = qmap.activations()  # quant tensor → float tensor
    outputs = [o.name for o in float_model.graph.output if o.name in {q.name for q in qmodel.graph.output}]
    inputs = {i.name for i in float_model.graph.input}
    fnames = [n for n in dict.fromkeys(list(pairs.values()) + outputs) if n not in inputs]
    qnames = list(dict.fromkeys(list(pairs) + outputs))
    fsess = make_session(float_model, fnames, device=device)
    qsess = make_session(qmodel, qnames, device=device)
    acc = {q: FidelityAccumulator() for q in pairs}
    out_acc = {o: FidelityAccumulator() for o in outputs}
    for i, feed in enumerate(samples):
        fvals = {**feed, **dict(zip(fnames, run_checked(fsess, fnames, feed, i)))}
        qvals = dict(zip(qnames, run_checked(qsess, qnames, feed, i)))
        for q, f in pairs.items():
            acc[q].update(np.asarray(fvals[f]), np.asarray(qvals[q]))
        for o in outputs:
            out_acc[o].update(np.asarray(fvals[o]), np.asarray(qvals[o]))
        if progress:
            progress("graphwise", i + 1, count)
    depths = tensor_depths(float_model)
    rows = [_row(pairs[q], q, depths, a) for q, a in acc.items() if a.count]
    rows.sort(key=lambda r: (r.depth, r.name))
    return rows, [_row(o, o, depths, a) for o, a in out_acc.items() if a.count]


def _row(name: str, quant_name: str, depths: dict, acc: FidelityAccumulator) -> TensorError:
    depth, op, node = depths.get(name, (0, "", ""))
    return TensorError(name, quant_name, op, node, depth, acc.metrics())


def tensor_samples(float_model: ModelProto, qmodel: ModelProto, rows: list[TensorError],
                   samples: Iterable[Sample], limit: int = 200_000,
                   device: str = "cpu") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Float and quantized values of a few tensors (for histograms), at most ``limit`` each."""
    inputs = {i.name for i in float_model.graph.input}
    fnames = [r.name for r in rows if r.name not in inputs]
    qnames = [r.quant_name for r in rows]
    fsess = make_session(float_model, fnames, device=device)
    qsess = make_session(qmodel, qnames, device=device)
    kept: dict[str, tuple[list, list]] = {r.name: ([], []) for r in rows}
    for i, feed in enumerate(samples):
        fvals = {**feed, **dict(zip(fnames, run_checked(fsess, fnames, feed, i)))}
        qvals = run_checked(qsess, qnames, feed, i)
        for r, q in zip(rows, qvals):
            f = fvals[r.name]
            kept[r.name][0].append(np.asarray(f, np.float32).ravel())
            kept[r.name][1].append(np.asarray(q, np.float32).ravel())
    out = {}
    for name, (fs, qs) in kept.items():
        f, q = np.concatenate(fs), np.concatenate(qs)
        step = max(1, f.size // limit)
        out[name] = (f[::step], q[::step])
    return out


def clip_range(qmodel: ModelProto, quant_name: str) -> tuple[float, float] | None:
    """The values the DequantizeLinear producing ``quant_name`` can give, ``[(qmin − z)·s,
    (qmax − z)·s]`` (per tensor; None for per-axis parameters or another producer)."""
    from onnx import helper, numpy_helper

    dq = next((n for n in qmodel.graph.node if quant_name in n.output), None)
    inits = {t.name: t for t in qmodel.graph.initializer}
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2 or dq.input[1] not in inits:
        return None
    scale = numpy_helper.to_array(inits[dq.input[1]])
    zp_t = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if scale.size != 1:
        return None
    z = float(numpy_helper.to_array(zp_t).reshape(-1)[0]) if zp_t is not None else 0.0
    dtype = helper.tensor_dtype_to_np_dtype(zp_t.data_type) if zp_t is not None else np.dtype(np.uint8)
    info = np.iinfo(dtype)
    s = float(scale.reshape(-1)[0])
    return (info.min - z) * s, (info.max - z) * s
