"""Intermediate tensors of a model on samples: whole (a layer's inputs, for the rounding
algorithms) or reduced per channel as they come (means for bias correction).

Both run the model once over the samples with the tensors exposed; per-channel reductions
keep only a running sum per channel, so memory does not grow with the number of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from onnx import ModelProto, ValueInfoProto

from edgequant.data.sources import Sample
from edgequant.errors import CalibrationDataError
from edgequant.ir.graph import subgraph_inputs
from edgequant.runtime.feed import run_in_place
from edgequant.runtime.session import make_session


def capture(model: ModelProto, tensors: list[str], samples: Iterable[Sample],
            device: str = "cpu") -> dict[str, list[np.ndarray]]:
    """Per tensor, its value on each sample (copies, in sample order)."""
    sess = make_session(model, tensors, device=device)
    out: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for i, feed in enumerate(samples):
        for t, v in zip(tensors, run_in_place(sess, tensors, feed, i)):
            out[t].append(np.array(v, dtype=np.float32))
    return out


def reduce_channels(model: ModelProto, tensors: list[str], samples: Iterable[dict[str, np.ndarray]],
                    axes: dict[str, int], reduce: Callable[[np.ndarray], np.ndarray],
                    merge: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` (onnxruntime, float) over ``samples`` and reduce each of ``tensors`` to one
    value per channel (``axes[name]``): ``reduce`` maps ``[n, C]`` to ``[C]``, ``merge``
    combines two samples' results. Reduced per sample: memory does not grow with them."""
    names = list(tensors)
    sess = make_session(model, names)
    result: dict[str, np.ndarray] = {}
    for feed in samples:
        for name, value in zip(names, sess.run(names, feed)):
            v = np.moveaxis(np.asarray(value, np.float64), axes[name], -1)
            low = reduce(v.reshape(-1, v.shape[-1]))
            result[name] = merge(result[name], low) if name in result else low
    if names and not result:
        raise CalibrationDataError("no calibration samples were given; pass at least one feed dict")
    return result


def channel_means(model: ModelProto, tensors: Mapping[str, int], samples: Iterable[Sample],
                  device: str = "cpu") -> dict[str, np.ndarray]:
    """Per tensor, the mean over samples and every axis but ``tensors[name]`` (its channel
    axis), in float64: ``mean_c = Σ x[..., c, ...] / count``, each element weighing the same
    whatever the sample's shape (a wider sample counts more)."""
    names = list(tensors)
    sess = make_session(model, names, device=device)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    for i, feed in enumerate(samples):
        for t, v in zip(names, run_in_place(sess, names, feed, i)):
            axis = tensors[t] % v.ndim
            rows = np.moveaxis(v, axis, 0).reshape(v.shape[axis], -1)
            s = rows.sum(axis=1, dtype=np.float64)
            sums[t] = sums[t] + s if t in sums else s
            counts[t] += rows.shape[1]
    return {t: sums[t] / max(counts[t], 1) for t in names if t in sums}


def truncated(model: ModelProto, outputs: list[str]) -> ModelProto:
    """``model`` cut down, in place, to what computes ``outputs`` (its only outputs now): the
    nodes they depend on (names an ``If``/``Loop`` body captures included) and the
    initializers those read; every graph input stays, so the same feeds run it. Returns
    ``model``."""
    graph = model.graph
    need = set(outputs)
    keep = []
    for node in reversed(graph.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
            need.update(subgraph_inputs(node))
    keep.reverse()
    graph.ClearField("node")
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in need]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    graph.ClearField("output")
    graph.output.extend(ValueInfoProto(name=o) for o in outputs)
    return model
