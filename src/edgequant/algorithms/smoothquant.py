"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights of the MatMul/Gemm
layers that read them.

``Y = X·W = (X / s)·(diag(s)·W)``: per input channel ``j``,
``s_j = max|X_j|^α / max|W_j|^(1−α)``, the weight rows (input-feature axis) are multiplied by
``s_j`` and the activation divided by it: folded into its producer (LayerNormalization, or a
decomposed LayerNorm ending in ``Mul``/``Add`` by constants), or by an inserted ``Mul``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, NodeProto, helper, numpy_helper

from edgequant.ir.graph import FLOAT_TYPES, GraphIndex, NameScope, get_attr, initializers
from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import (
    DEFAULT_SCHEME,
    Scheme,
    compute_params,
    dequantize_array,
    quantize_array,
)
from edgequant.runtime.capture import reduce_channels

log = logging.getLogger(__name__)


def channel_absmax(model: ModelProto, tensors: list[str],
                   samples: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``max |x|`` per input channel (the last axis) of each of ``tensors`` over all samples.

    Example: samples ``[[1, -5]]`` and ``[[-3, 2]]`` → ``[3, 5]``."""
    axes = dict.fromkeys(tensors, -1)
    return reduce_channels(model, tensors, samples, axes, lambda v: np.abs(v).max(axis=0), np.maximum)


def smoothing_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float,
                     bounds: tuple[float, float] = (1e-4, 1e4)) -> np.ndarray:
    """``s_j = a_j^α / w_j^(1−α)`` clamped to ``bounds``; 1 where ``a_j`` or ``w_j`` is 0.

    Example: ``a = [100, 1]``, ``w = [1, 1]``, α = 0.5 → ``s = [10, 1]``: the activation
    channels become ``[10, 1]``, the weight rows ``[10, 1]``."""
    a, w = np.asarray(act_max, np.float64), np.asarray(weight_max, np.float64)
    live = (a > 0) & (w > 0)
    s = np.power(np.where(live, a, 1.0), alpha) / np.power(np.where(live, w, 1.0), 1.0 - alpha)
    return np.where(live, np.clip(s, *bounds), 1.0)


@dataclass(frozen=True)
class SmoothReport:
    """``activations``: tensors smoothed; ``layers``: MatMul/Gemm nodes whose weight rows were
    scaled; ``folded``: (activation, where 1/s went: ``LayerNormalization``, ``Mul``,
    ``Mul+Add``); ``inserted``: the ``Mul`` nodes added; ``flatness_*``: mean over the
    activations of max/min of their per-channel ``max |x|`` (zero channels left out), before
    and after (``a / s``)."""

    alpha: float
    activations: tuple[str, ...]
    layers: tuple[str, ...]
    folded: tuple[tuple[str, str], ...]
    inserted: tuple[str, ...]
    flatness_before: float
    flatness_after: float

    @property
    def changed(self) -> bool:
        return bool(self.activations)


def _flatness(vectors: list[np.ndarray]) -> float:
    ratios = [float(v[v > 0].max() / v[v > 0].min()) for v in vectors if (v > 0).any()]
    return float(np.mean(ratios)) if ratios else 1.0


class _Smoother:
    """One rewrite of a graph: scales weights, folds or inserts the inverse scales."""

    def __init__(self, model: ModelProto):
        self.graph = model.graph
        self.index = GraphIndex(model.graph)
        self.inits = initializers(model.graph)
        self.scope = NameScope(model.graph)
        self.inserted: list[tuple[str, NodeProto]] = []  # (tensor it follows, node)

    def constant(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        ok = t is not None and t.data_type in FLOAT_TYPES and name not in self.index.inputs
        return numpy_helper.to_array(t) if ok and t is not None else None

    def row_axis(self, node: NodeProto, tensor: str) -> int | None:
        """Input-feature axis of the weight of a MatMul/Gemm reading ``tensor`` as input 0."""
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[0] != tensor:
            return None
        w = self.constant(node.input[1])
        if w is None or w.ndim < 2 or node.input[1] == tensor:
            return None
        if node.op_type == "MatMul":
            return w.ndim - 2
        if node.op_type == "Gemm" and not get_attr(node, "transA", 0) and w.ndim == 2:
            return 1 if get_attr(node, "transB", 0) else 0
        return None

    def layers_of(self, tensor: str, channels: int) -> list[tuple[NodeProto, int]]:
        found = []
        for node in self.index.consumers.get(tensor, []):
            axis = self.row_axis(node, tensor)
            if axis is not None and self.inits[node.input[1]].dims[axis] == channels:
                found.append((node, axis))
        return found

    def put(self, uses: list[tuple[NodeProto, int]], value: np.ndarray) -> None:
        """Make every ``node.input[k]`` of ``uses`` (one initializer) hold ``value``: in place
        when nobody else reads it, else under one fresh name (the others keep the old one)."""
        name = uses[0][0].input[uses[0][1]]
        dtype = numpy_helper.to_array(self.inits[name]).dtype
        readers = {id(n) for n, _ in uses}
        if any(id(n) not in readers for n in self.index.consumers.get(name, [])):
            name = self.scope.fresh(name + "_smooth")
            for node, k in uses:
                node.input[k] = name
            self.inits[name] = self.graph.initializer.add()
        self.inits[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))

    def scale_weights(self, group: list[tuple[NodeProto, int]], s: np.ndarray) -> None:
        """``W[j, :] *= s_j`` along each weight's input-feature axis (a shared weight once)."""
        by_weight: dict[str, list[tuple[NodeProto, int]]] = {}
        for node, axis in group:
            by_weight.setdefault(node.input[1], []).append((node, axis))
        for name, uses in by_weight.items():
            w = numpy_helper.to_array(self.inits[name]).astype(np.float64)
            shape = [1] * w.ndim
            shape[uses[0][1]] = -1
            self.put([(n, 1) for n, _ in uses], w * s.reshape(shape))

    def per_channel(self, node: NodeProto, channels: int) -> tuple[int, np.ndarray] | None:
        """The input of a two-input ``node`` that is a constant broadcast along the last axis
        only (a scalar, or ``[..., C]`` of size C), with its position."""
        for k, name in enumerate(node.input):
            c = self.constant(name) if len(node.input) == 2 else None
            if c is not None and (c.size == 1 or (c.shape[-1] == channels and c.size == channels)):
                return k, c
        return None

    def private(self, tensor: str) -> bool:
        return len(self.index.consumers.get(tensor, [])) == 1 and tensor not in self.index.outputs

    def fold(self, tensor: str, inv: np.ndarray) -> str | None:
        """Divide ``tensor`` by ``s`` inside its producer; how it was done, or None."""
        prod = self.index.producers.get(tensor)
        if prod is None or prod.domain not in ("", "ai.onnx") or tensor in self.index.outputs:
            return None
        if prod.op_type == "LayerNormalization" and prod.output[0] == tensor:
            consts = [(k, self.constant(prod.input[k])) for k in (1, 2) if len(prod.input) > k and prod.input[k]]
            ok = bool(consts) and consts[0][0] == 1 and all(c is not None and c.size == inv.size and c.shape[-1] == inv.size for _, c in consts)
            steps = [(prod, k, c) for k, c in consts if c is not None] if ok else []
        else:
            steps = self._affine_steps(prod, inv.size)
        for node, k, c in steps:
            self.put([(node, k)], c.astype(np.float64) * inv)
        return "+".join(dict.fromkeys(n.op_type for n, _, _ in reversed(steps))) or None

    def _affine_steps(self, prod: NodeProto, channels: int) -> list[tuple[NodeProto, int, np.ndarray]]:
        """``… → Mul(γ)`` or ``… → Mul(γ) → Add(β)`` by per-channel constants: both scale."""
        found = self.per_channel(prod, channels) if prod.op_type in ("Mul", "Add") else None
        if found is None:
            return []
        if prod.op_type == "Mul":
            return [(prod, *found)]
        y = prod.input[1 - found[0]]
        mul = self.index.producers.get(y)
        inner = self.per_channel(mul, channels) if mul is not None and mul.op_type == "Mul" else None
        if inner is None or not self.private(y) or mul is None or mul.domain not in ("", "ai.onnx"):
            return []
        return [(prod, *found), (mul, *inner)]

    def insert_mul(self, tensor: str, inv: np.ndarray, group: list[tuple[NodeProto, int]]) -> str:
        """``tensor → Mul(1/s) → tensor_smoothed``, read by the smoothed layers only."""
        dtype = numpy_helper.to_array(self.inits[group[0][0].input[1]]).dtype
        scale, out = self.scope.fresh(tensor + "_smooth_inv"), self.scope.fresh(tensor + "_smoothed")
        self.graph.initializer.append(numpy_helper.from_array(inv.astype(dtype), scale))
        node = helper.make_node("Mul", [tensor, scale], [out], name=self.scope.fresh(tensor + "_smooth"))
        self._typed_like(tensor, out, helper.np_dtype_to_tensor_dtype(dtype))
        for layer, _ in group:
            layer.input[0] = out
        self.inserted.append((tensor, node))
        return node.name

    def _typed_like(self, tensor: str, out: str, elem_type: int) -> None:
        """``out`` gets ``tensor``'s type and shape in value_info: the planner quantizes only
        tensors whose type it knows (untyped, the smoothed MatMuls read float inputs)."""
        known = [vi for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output)
                 if vi.name == tensor and vi.type.HasField("tensor_type")]
        vi = self.graph.value_info.add()
        if known:
            vi.CopyFrom(known[0])
            vi.name = out
        else:
            vi.CopyFrom(helper.make_tensor_value_info(out, elem_type, None))

    def place_inserted(self) -> None:
        """Each inserted Mul right after the producer of what it reads (topological order kept)."""
        if not self.inserted:
            return
        after: dict[str, list[NodeProto]] = {}
        for tensor, node in self.inserted:
            after.setdefault(tensor, []).append(node)
        order = [n for t in list(after) if t not in self.index.producers for n in after.pop(t)]
        for node in list(self.graph.node):
            order.append(node)
            for o in node.output:
                order += after.pop(o, [])
        self.graph.ClearField("node")
        self.graph.node.extend(order)


def _row_ranges(model_inits: dict, group: list[tuple[NodeProto, int]]) -> np.ndarray:
    """``max |W_j|`` per input channel, the maximum over every layer of the group."""
    ranges = []
    for node, axis in group:
        w = numpy_helper.to_array(model_inits[node.input[1]])
        ranges.append(np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1))
    return np.max(ranges, axis=0).astype(np.float64)


ALPHA_GRID = tuple(np.round(np.arange(0.0, 1.0001, 0.1), 2))
#: Rows of an activation the α search keeps (sampled evenly from the calibration samples).
SEARCH_ROWS = 4096


def activation_rows(model: ModelProto, tensors: list[str], samples: Iterable[dict[str, np.ndarray]],
                    limit: int = SEARCH_ROWS) -> dict[str, np.ndarray]:
    """Rows ``[R, C]`` of each of ``tensors`` (channels on the last axis), at most ``limit``
    spread over the samples: every ``k``-th row of each sample, in order."""
    from edgequant.runtime.session import make_session

    feeds = list(samples)
    sess = make_session(model, list(tensors))
    kept: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    per_sample = max(1, limit // max(1, len(feeds)))
    for feed in feeds:
        for name, value in zip(tensors, sess.run(list(tensors), feed)):
            rows = np.asarray(value, np.float32).reshape(-1, np.shape(value)[-1])
            step = max(1, len(rows) // per_sample)
            kept[name].append(rows[::step][:per_sample])
    return {t: np.concatenate(v) for t, v in kept.items() if v}


@dataclass(frozen=True)
class AlphaSearch:
    """How ``choose_alphas`` quantizes its trial products, as the plan will: per-tensor
    activations; weights per output channel where the options quantize that op type per channel
    (``per_channel``, ``per_channel_ops``), else per tensor; scales by ``scheme`` (power of two).

    With per-tensor weights the search must see them per tensor: judged per channel, it chose
    α that took MiniLM's output cosine from 0.830 (plain) to 0.691 under ``per_channel=False``."""

    activation_dtype: QuantDType = QuantDType.UINT8
    activation_symmetric: bool = False
    weight_dtype: QuantDType = QuantDType.INT8
    grid: tuple[float, ...] = ALPHA_GRID
    per_channel: bool = True
    per_channel_ops: tuple[str, ...] | None = None
    scheme: Scheme = DEFAULT_SCHEME

    def weight_axis(self, op_type: str) -> int | None:
        """The output-channel axis of a ``[K, N]`` weight, or None for a per-tensor one."""
        wanted = self.per_channel and (self.per_channel_ops is None or op_type in self.per_channel_ops)
        return 1 if wanted else None


def _fake(x: np.ndarray, dtype: QuantDType, symmetric: bool, axis: int | None,
          scheme: Scheme = DEFAULT_SCHEME) -> np.ndarray:
    if axis is None:
        p = compute_params(float(x.min()), float(x.max()), dtype, symmetric, scheme=scheme)
    else:
        other = tuple(i for i in range(x.ndim) if i != axis)
        p = compute_params(x.min(axis=other), x.max(axis=other), dtype, symmetric, axis, scheme=scheme)
    return dequantize_array(quantize_array(x, p, scheme), p)


def choose_alphas(model: ModelProto, rows: dict[str, np.ndarray], absmax: dict[str, np.ndarray],
                  search: AlphaSearch = AlphaSearch()) -> dict[str, float | None]:
    """Per activation of ``rows``, the α of ``search.grid`` whose quantized products with the
    weights of every layer reading it (``Q(X/s)·Q(s·W)``) have the least error against ``X·W``,
    summed over the layers relative to each one's power; None where no smoothing is best."""
    sm = _Smoother(model)
    out: dict[str, float | None] = {}
    for tensor, x in rows.items():
        a = np.asarray(absmax[tensor], np.float64).reshape(-1)
        group = sm.layers_of(tensor, a.size)
        mats, axes = [], []
        for node, axis in group:
            w = numpy_helper.to_array(sm.inits[node.input[1]]).astype(np.float32)
            if w.ndim != 2:
                break
            mats.append(w if axis == 0 else w.T)  # [K, N]: X·W
            axes.append(search.weight_axis(node.op_type))
        if not group or len(mats) != len(group):
            continue
        x32 = x.astype(np.float32)
        refs = [(x32 @ w, k) for w, k in zip(mats, axes)]
        w_max = _row_ranges(sm.inits, group)
        best, best_err = None, _product_error(x32, mats, refs, np.ones(a.size, np.float32), search)
        for alpha in search.grid:
            s = smoothing_scales(a, w_max, float(alpha)).astype(np.float32)
            e = _product_error(x32, mats, refs, s, search)
            if e < best_err:
                best, best_err = float(alpha), e
        out[tensor] = best
    return out


def _product_error(x: np.ndarray, mats: list[np.ndarray], refs: list[tuple[np.ndarray, int | None]],
                   s: np.ndarray, search: AlphaSearch) -> float:
    """Σ over the layers of ``mean((Q(x/s)·Q(s·W) − x·W)²) / mean((x·W)²)`` (``refs``: each
    layer's ``x·W`` and its weight's quantization axis)."""
    xq = _fake((x / s).astype(np.float32), search.activation_dtype, search.activation_symmetric, None,
               search.scheme)
    total = 0.0
    for w, (ref, axis) in zip(mats, refs):
        wq = _fake((w * s[:, None]).astype(np.float32), search.weight_dtype, True, axis, search.scheme)
        total += float(np.mean((xq @ wq - ref) ** 2)) / max(float(np.mean(ref * ref)), 1e-30)
    return total


def smooth(model: ModelProto, absmax: dict[str, np.ndarray], alpha: float | Mapping[str, float | None] = 0.5, *,
           bounds: tuple[float, float] = (1e-4, 1e4)) -> SmoothReport:
    """SmoothQuant in place: every tensor of ``absmax`` (per-channel ``max |x|`` over the last
    axis, ``channel_absmax``) read as input 0 by MatMul/Gemm nodes with constant weights.
    ``alpha``: one α, or one per tensor (``choose_alphas``; a tensor mapped to None, or left
    out, is not smoothed).

    All those layers share one ``s`` (``max |W_j|`` the maximum over them). ``1/s`` is folded
    into the producer when every reader of the tensor (but ``Shape``) is smoothed and it is no graph
    output: LayerNormalization (scale and bias with one value per channel) or ``Mul(γ)`` /
    ``Mul(γ) → Add(β)`` by constants; otherwise a ``Mul`` by a ``1/s`` initializer is put before
    the smoothed layers. The float outputs stay equal up to rounding.
    """
    sm = _Smoother(model)
    acts, layers, folded, before, after = [], [], [], [], []
    for tensor in sm.index.tensor_names():
        a = np.asarray(absmax[tensor], np.float64).reshape(-1) if tensor in absmax else None
        group = sm.layers_of(tensor, a.size) if a is not None else []
        this = alpha.get(tensor) if isinstance(alpha, Mapping) else alpha
        if a is None or not group or this is None:
            continue
        s = smoothing_scales(a, _row_ranges(sm.inits, group), this, bounds)
        sm.scale_weights(group, s)
        readers = sm.index.consumers.get(tensor, [])  # a Shape reads no values: no obstacle
        alone = sum(n.op_type != "Shape" for n in readers) == len(group)
        how = sm.fold(tensor, 1.0 / s) if alone else None
        if how is None:
            sm.insert_mul(tensor, 1.0 / s, group)
        else:
            folded.append((tensor, how))
        acts.append(tensor)
        layers += [n.name or n.output[0] for n, _ in group]
        before.append(a)
        after.append(a / s)
    sm.place_inserted()
    for tensor in set(absmax) - set(acts):
        log.debug("smooth: %s is read by no MatMul/Gemm with a constant weight; left alone", tensor)
    chosen = alpha if not isinstance(alpha, Mapping) else \
        float(np.mean([v for t, v in alpha.items() if v is not None and t in acts] or [0.0]))
    return SmoothReport(chosen, tuple(acts), tuple(layers), tuple(folded),
                        tuple(n.name for _, n in sm.inserted), _flatness(before), _flatness(after))
