"""Cross-layer equalization and high-bias absorption of a float model (Nagel et al. 2019,
"Data-Free Quantization Through Weight Equalization and Bias Correction", §4.1–4.2).

A pair ``W1 → act → W2`` (Conv → Conv, grouped and depthwise included, or Gemm/MatMul →
Gemm/MatMul) where ``act`` is positive-homogeneous per channel (``act(s·x) = s·act(x)`` for
``s > 0``: none, Relu, LeakyRelu, PRelu with a scalar or per-channel slope, Identity,
``Clip(0, ∞)``) computes the same function after, per channel ``i`` between them,
``W1[i] /= s_i``, ``b1[i] /= s_i``, ``W2[:, i] *= s_i``. CLE picks ``s_i = sqrt(r1_i / r2_i)``
(``r1_i`` the range of W1's output channel i, ``r2_i`` that of W2's input channel i) so that both
become ``sqrt(r1_i · r2_i)``: per-tensor weight quantization then wastes fewer levels.

A ReLU6 (``Clip(0, M)``) is not homogeneous: ``min(max(x / s, 0), M) ≠ min(max(x, 0), M) / s``.
By default (``relu6="bound"``) such a pair is equalized anyway and the Clip becomes
``Min(Relu(x'), M / s_i − c_i)`` (a per-channel bound, ``c_i`` an absorbed bias), which computes
exactly what the Clip did; ``relu6="relu"`` replaces it by Relu as Nagel et al. and AIMET do
(the float model changes wherever values exceeded M: on EfficientNet-Lite0, whose ReLU6s
saturate, top-1 0.96 → 0.38 under ``espdl-s3``); ``relu6="skip"`` leaves those pairs alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper

from edgequant.errors import ConfigError
from edgequant.ir.graph import FLOAT_TYPES, GraphIndex, NameScope, get_attr, initializers
from edgequant.runtime.capture import reduce_channels

HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "Identity", "Clip"}
CHANNEL_FIRST = {"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization"}
_TINY = 1e-12


def equalization_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """``s_i = (1 / r2_i) · sqrt(r1_i · r2_i) = sqrt(r1_i / r2_i)``; 1 where either range is 0.

    Example: ``r1 = [4, 1]``, ``r2 = [1, 4]`` → ``s = [2, 0.5]``; after ``W1[i] /= s_i``,
    ``W2[:, i] *= s_i`` both ranges are ``[2, 2]``."""
    r1, r2 = np.asarray(r1, np.float64), np.asarray(r2, np.float64)
    live = (r1 > _TINY) & (r2 > _TINY)
    return np.where(live, np.sqrt(np.where(live, r1, 1.0) / np.where(live, r2, 1.0)), 1.0)


@dataclass
class Layer:
    """A weighted node. Its weight seen as ``(groups, out/groups, in/groups, rest)``; a 2-D
    linear weight stored ``[in, out]`` (Gemm transB = 0, MatMul) is ``transposed``. The
    effective bias is ``b_gain · bias`` and the product ``w_gain · x·W`` (Gemm beta, alpha)."""

    node: NodeProto
    weight: str
    groups: int
    transposed: bool
    bias: str | None
    bias_node: NodeProto | None
    output: str
    w_gain: float = 1.0
    b_gain: float = 1.0

    @property
    def conv(self) -> bool:
        return self.node.op_type == "Conv"

    def view(self, w: np.ndarray) -> np.ndarray:
        w = w.T if self.transposed else w
        return w.reshape(self.groups, w.shape[0] // self.groups, w.shape[1], -1)

    def unview(self, v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return v.reshape(shape[::-1]).T if self.transposed else v.reshape(shape)


@dataclass
class Pair:
    first: Layer
    second: Layer
    act: NodeProto | None
    relu6: bool
    scale: np.ndarray  # product of every s applied (W1's output is divided by it)
    absorbed: np.ndarray | None = None  # the bias c moved into W2 (in W1's scaled output units)
    upper: float | None = None  # M of a ReLU6 act (Clip(0, M))


@dataclass(frozen=True)
class CLEReport:
    """``pairs``: (first, second) node labels (name, else first output); ``iterations``: sweeps
    over all pairs; ``range_ratio_*``: mean over the paired layers of max/min of their
    per-output-channel weight ranges (zero channels left out); ``activations_replaced``: Clip(0, M)
    nodes turned into Relu (the float model changes there); ``biases_absorbed``: pairs whose
    high bias moved into the next layer; ``activations_bounded``: Clip(0, M) nodes now a Relu and
    a per-channel Min (exact)."""

    pairs: tuple[tuple[str, str], ...]
    iterations: int
    converged: bool
    range_ratio_before: float
    range_ratio_after: float
    activations_replaced: tuple[str, ...]
    biases_absorbed: int
    activations_bounded: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.pairs)


def _label(node: NodeProto) -> str:
    return node.name or node.output[0]


class _Finder:
    """Finds the pairs of a graph (one index, one forward walk)."""

    def __init__(self, model: ModelProto, relu6: str):
        self.index = GraphIndex(model.graph)
        self.inits = initializers(model.graph)
        self.relu6 = relu6
        self.layers: dict[int, Layer | None] = {}  # one Layer per node, whichever role it plays

    def private(self, tensor: str) -> bool:
        """Read by exactly one node and not a graph output (nor an initializer)."""
        idx = self.index
        return (len(idx.consumers.get(tensor, [])) == 1 and tensor not in idx.outputs
                and tensor not in self.inits)

    def constant(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        if t is None or t.data_type not in FLOAT_TYPES or name in self.index.inputs:
            return None
        return numpy_helper.to_array(t)

    def owned(self, name: str) -> bool:
        """An initializer only this one node reads, so it may be rewritten in place."""
        return self.constant(name) is not None and len(self.index.consumers.get(name, [])) == 1

    def layer(self, node: NodeProto | None) -> Layer | None:
        if node is not None and id(node) not in self.layers:
            self.layers[id(node)] = self._layer(node)
        return None if node is None else self.layers[id(node)]

    def _layer(self, node: NodeProto | None) -> Layer | None:
        if node is None or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return None
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.input[0] in self.inits:
            return None
        if not self.owned(node.input[1]) or get_attr(node, "transA", 0):
            return None
        dims = list(self.inits[node.input[1]].dims)
        if node.op_type == "Conv":
            groups = int(get_attr(node, "group", 1))
            if len(dims) < 3 or dims[0] % groups:
                return None
            return self._with_bias(Layer(node, node.input[1], groups, False, None, None, node.output[0]), dims[0])
        if len(dims) != 2:
            return None
        transposed = not (node.op_type == "Gemm" and get_attr(node, "transB", 0))
        layer = Layer(node, node.input[1], 1, transposed, None, None, node.output[0],
                      float(get_attr(node, "alpha", 1.0)), float(get_attr(node, "beta", 1.0)))
        return self._with_bias(layer, dims[1] if transposed else dims[0])

    def _with_bias(self, layer: Layer, channels: int) -> Layer | None:
        """The layer's bias: its own input (Conv, Gemm), else an ``Add`` by a per-channel
        constant right after it (a MatMul's, or a Conv exported without its bias)."""
        node = layer.node
        if len(node.input) > 2 and node.input[2]:
            if not self._bias_ok(node.input[2], channels, False, 1):
                return None
            layer.bias, layer.bias_node = node.input[2], node
            return layer
        users = self.index.consumers.get(node.output[0], [])
        add = users[0] if node.op_type != "Gemm" and self.private(node.output[0]) else None
        if add is not None and add.op_type == "Add" and len(add.input) == 2:
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            rank = len(self.inits[layer.weight].dims)
            if other != node.output[0] and self._bias_ok(other, channels, layer.conv, rank):
                layer.bias, layer.bias_node, layer.output = other, add, add.output[0]
        return layer

    def _bias_ok(self, name: str, channels: int, conv: bool, rank: int) -> bool:
        b = self.constant(name) if self.owned(name) else None
        return b is not None and b.size == channels and _per_channel(b, conv, channels, rank)

    def act_kind(self, act: NodeProto, first: Layer, channels: int, rank: int) -> str | None:
        """"keep" (positive-homogeneous), "relu6" (Clip(0, M): bounded per channel or replaced
        by Relu, as ``relu6`` says), or None."""
        if act.op_type in ("Relu", "Identity", "LeakyRelu"):
            return "keep"
        if act.op_type == "PRelu":
            slope = self.constant(act.input[1]) if len(act.input) > 1 else None
            return "keep" if slope is not None and _per_channel(slope, first.conv, channels, rank) else None
        lo, hi = self._clip_bounds(act)
        if lo != 0.0:
            return None
        if hi is None or np.isinf(hi):
            return "keep"
        return "relu6" if self.relu6 in ("bound", "relu") else None

    def _clip_bounds(self, clip: NodeProto) -> tuple[float | None, float | None]:
        if len(clip.input) == 1 and clip.attribute:  # opset < 11: attributes
            return get_attr(clip, "min", None), get_attr(clip, "max", None)
        bounds: list[float | None] = []
        for k in (1, 2):
            name = clip.input[k] if len(clip.input) > k else ""
            value = self.constant(name) if name else None
            bounds.append(None if value is None or value.size != 1 else float(value.reshape(-1)[0]))
        lo = bounds[0] if len(clip.input) > 1 and clip.input[1] else -np.inf
        return lo, bounds[1]

    def writer(self, tensor: str) -> Layer | None:
        """The layer whose output (after its bias: a MatMul's Add) is ``tensor``."""
        node = self.index.producers.get(tensor)
        if node is not None and node.op_type == "Add":
            node = next((self.index.producers[i] for i in node.input if i in self.index.producers
                         and self.index.producers[i].op_type in ("MatMul", "Conv")), None)
        layer = self.layer(node)
        return layer if layer is not None and layer.output == tensor else None

    def pair_into(self, node: NodeProto) -> Pair | None:
        second = self.layer(node)
        if second is None or not self.private(node.input[0]):
            return None
        tensor, act = node.input[0], self.index.producers.get(node.input[0])
        first = self.writer(tensor)
        if first is None and act is not None and act.op_type in HOMOGENEOUS and act.domain in ("", "ai.onnx"):
            tensor = act.input[0]
            first = self.writer(tensor) if self.private(tensor) else None
        else:
            act = None
        if first is None or first.output != tensor or first.conv != second.conv:
            return None
        w1, w2 = (self.constant(x.weight) for x in (first, second))
        assert w1 is not None and w2 is not None  # owned() checked them
        channels = first.view(w1).shape[0] * first.view(w1).shape[1]
        if w1.ndim != w2.ndim or channels != second.groups * second.view(w2).shape[2]:
            return None
        kind = self.act_kind(act, first, channels, w1.ndim) if act is not None else "keep"
        if kind is None:
            return None
        upper = self._clip_bounds(act)[1] if kind == "relu6" and act is not None else None
        return Pair(first, second, act, kind == "relu6", np.ones(channels), upper=upper)


def _per_channel(slope: np.ndarray, conv: bool, channels: int, rank: int) -> bool:
    """A PRelu slope (or bias) that is one scalar, or varies along the channel axis only (axis 1 of a
    rank-``rank`` Conv activation, the last axis for Gemm/MatMul; ONNX broadcasts it
    right-aligned, so a ``[C]`` slope on NCHW varies along W and is refused)."""
    if slope.size == 1:
        return True
    if slope.size != channels:
        return False
    if not conv:
        return slope.shape[-1] == channels
    full = [1] * (rank - slope.ndim) + list(slope.shape)
    return slope.ndim <= rank and full[1] == channels


def find_pairs(model: ModelProto, relu6: str = "bound") -> list[Pair]:
    """Every equalizable pair, in graph order (see the module docstring for the rules)."""
    _check_relu6(relu6)
    finder = _Finder(model, relu6)
    pairs = [p for p in (finder.pair_into(n) for n in model.graph.node) if p is not None]
    return pairs


class _Weights:
    """Float64 working copies of the initializers CLE rewrites; written back once, in the
    original dtype and shape (new biases appended under fresh names)."""

    def __init__(self, model: ModelProto):
        self.graph = model.graph
        self.inits = initializers(model.graph)
        self.arrays: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.scope = NameScope(model.graph)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            a = numpy_helper.to_array(self.inits[name])
            self.arrays[name], self.dtypes[name] = a.astype(np.float64), a.dtype
        return self.arrays[name]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.arrays[name] = value

    def add_bias(self, layer: Layer, channels: int) -> bool:
        """Give a Conv or Gemm without a bias a zero one (a MatMul without its Add: False)."""
        if layer.bias is not None:
            return True
        if layer.node.op_type == "MatMul":
            return False
        name = self.scope.fresh(layer.weight + "_bias")
        self.arrays[name] = np.zeros(channels)
        self.dtypes[name] = numpy_helper.to_array(self.inits[layer.weight]).dtype
        layer.node.input.append(name)
        layer.bias, layer.bias_node = name, layer.node
        return True

    def write(self) -> None:
        for name, value in self.arrays.items():
            tensor = numpy_helper.from_array(value.astype(self.dtypes[name]), name)
            if name in self.inits:
                self.inits[name].CopyFrom(tensor)
            else:
                self.graph.initializer.append(tensor)


def _equalize_pair(pair: Pair, weights: _Weights) -> float:
    """Apply ``s = sqrt(r1 / r2)`` to one pair; returns ``max |s_i − 1|``."""
    first, second = pair.first, pair.second
    w1, w2 = weights[first.weight], weights[second.weight]
    v1, v2 = first.view(w1), second.view(w2)
    r1 = np.abs(v1).max(axis=(2, 3)).reshape(-1)
    r2 = np.abs(v2).max(axis=(1, 3)).reshape(-1)
    s = equalization_scales(r1, r2)
    weights[first.weight] = first.unview(v1 / s.reshape(v1.shape[0], v1.shape[1], 1, 1), w1.shape)
    weights[second.weight] = second.unview(v2 * s.reshape(v2.shape[0], 1, v2.shape[2], 1), w2.shape)
    if first.bias is not None:
        b = weights[first.bias]
        weights[first.bias] = (b.reshape(-1) / s).reshape(b.shape)
    pair.scale = pair.scale * s
    return float(np.max(np.abs(s - 1.0))) if s.size else 0.0


def _range_ratio(layers: list[Layer], weights: _Weights) -> float:
    """Mean over ``layers`` of max/min of the per-output-channel ranges ``max |W[o]|``."""
    ratios = []
    for layer in layers:
        r = np.abs(layer.view(weights[layer.weight])).max(axis=(2, 3)).reshape(-1)
        r = r[r > _TINY]
        if r.size:
            ratios.append(float(r.max() / r.min()))
    return float(np.mean(ratios)) if ratios else 1.0


def _zero_padded_free(node: NodeProto) -> bool:
    """True for Gemm/MatMul, and for a Conv that pads nothing (zeros inserted by padding would
    stand where a shifted input holds ``c``: the absorbed bias would be wrong at the border)."""
    if node.op_type != "Conv":
        return True
    auto_pad = get_attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad in ("NOTSET", "VALID") and not any(get_attr(node, "pads", []) or [])


def _absorb(pair: Pair, lower: np.ndarray, weights: _Weights) -> bool:
    """High-bias absorption: with ``x ≥ c ≥ 0`` per channel before ``act`` (every allowed act
    is the identity on ``[0, ∞)``), ``act(x − c) + c = act(x)``, so ``b1 −= c`` and
    ``b2 += W2·c``. For a Conv W2, ``(W2·c)[o] = Σ_{i, kernel} W2[o, i, …] · c_i`` (within
    its group). Example: ``c = [1]``, ``W2 = [[2], [3]]`` (2 outputs): ``b2 += [2, 3]``."""
    first, second = pair.first, pair.second
    c = np.maximum(np.asarray(lower, np.float64).reshape(-1) / pair.scale, 0.0)
    if not c.any() or not _zero_padded_free(second.node) or first.b_gain == 0 or second.b_gain == 0:
        return False
    v2 = second.view(weights[second.weight])
    out = v2.shape[0] * v2.shape[1]
    if not (weights.add_bias(first, c.size) and weights.add_bias(second, out)):
        return False
    assert first.bias is not None and second.bias is not None
    b1, b2 = weights[first.bias], weights[second.bias]
    shift = (v2.sum(axis=3) * c.reshape(v2.shape[0], 1, v2.shape[2])).sum(axis=2).reshape(-1)
    weights[first.bias] = (b1.reshape(-1) - c / first.b_gain).reshape(b1.shape)
    weights[second.bias] = (b2.reshape(-1) + second.w_gain * shift / second.b_gain).reshape(b2.shape)
    pair.absorbed = c
    return True


RELU6_MODES = ("bound", "relu", "skip")


def _check_relu6(mode: str) -> None:
    if mode not in RELU6_MODES:
        raise ConfigError(f"cle_relu6 must be one of {', '.join(RELU6_MODES)}, got {mode!r}")


def _to_relu(clip: NodeProto) -> None:
    clip.op_type = "Relu"
    del clip.input[1:]
    clip.ClearField("attribute")


def _bound(model: ModelProto, pair: Pair, rank: int, names: NameScope) -> None:
    """The pair's Clip(0, M) as ``Min(Relu(x), M / s − c)`` per channel (exact): the Relu writes
    a new tensor, a Min with the bound constant (shaped [C, 1, …] for a Conv output, [C]
    otherwise) writes the Clip's output."""
    clip = pair.act
    assert clip is not None and pair.upper is not None
    scale = pair.scale.astype(np.float64)
    bound = pair.upper / scale - (pair.absorbed if pair.absorbed is not None else 0.0)
    if pair.first.conv:
        bound = bound.reshape((-1,) + (1,) * (rank - 2))
    out = clip.output[0]
    inner = names.fresh(f"{out}_relu")
    const = names.fresh(f"{out}_bound")
    _to_relu(clip)
    clip.output[0] = inner
    model.graph.initializer.append(numpy_helper.from_array(bound.astype(np.float32), const))
    known = next((v for v in model.graph.value_info if v.name == out), None)
    info = model.graph.value_info.add()
    if known is not None:
        info.CopyFrom(known)
        info.name = inner
    else:  # the planner reads element types from value_info
        info.CopyFrom(helper.make_tensor_value_info(inner, onnx.TensorProto.FLOAT, None))
    at = list(model.graph.node).index(clip) + 1
    model.graph.node.insert(at, helper.make_node("Min", [inner, const], [out], name=names.fresh(f"{clip.name or out}_min")))


def equalize(model: ModelProto, iterations: int = 100, tolerance: float = 1e-4, *,
             relu6: str = "bound", absorb_bias: bool = False,
             minima: dict[str, np.ndarray] | None = None) -> CLEReport:
    """Cross-layer equalization of ``model`` in place (BN folded, constants as initializers).

    Sweeps every pair in graph order until no scale moves more than ``tolerance``
    (``max |s − 1|``) or after ``iterations`` sweeps; chains (Conv → DW → Conv) converge over
    the sweeps. ``relu6``: how a ``Clip(0, M)`` between a pair is treated (module docstring):
    ``bound`` (exact per-channel Min), ``relu`` (becomes Relu; the float model changes where
    values exceeded M; listed in the report) or ``skip`` (the pair is left out).
    ``absorb_bias``: ``minima`` maps a pair's pre-activation tensor (W1's output, after its
    bias) to a per-channel lower bound measured on the model *as given* (``channel_minima``);
    exact on data that respects the bound. Only a W2 without spatial padding absorbs.
    """
    if absorb_bias and minima is None:
        raise ConfigError("equalize(absorb_bias=True) needs minima: per-channel lower bounds of the "
                          "pre-activation tensors, e.g. from channel_minima(model, tensors, samples)")
    pairs = find_pairs(model, relu6)
    weights = _Weights(model)
    layers = list({id(x.node): x for p in pairs for x in (p.first, p.second)}.values())
    before = _range_ratio(layers, weights)
    sweeps, converged = 0, not pairs
    while pairs and sweeps < iterations and not converged:
        sweeps += 1
        converged = max(_equalize_pair(p, weights) for p in pairs) <= tolerance
    absorbed = 0
    if absorb_bias and minima is not None:
        absorbed = sum(_absorb(p, minima[p.first.output], weights) for p in pairs if p.first.output in minima)
    after = _range_ratio(layers, weights)
    weights.write()
    clipped = [p for p in pairs if p.relu6 and p.act is not None]
    labels = tuple(_label(p.act) for p in clipped if p.act is not None)
    if relu6 == "relu":
        for p in clipped:
            assert p.act is not None
            _to_relu(p.act)
    else:
        names = NameScope(model.graph)
        ranks = {t.name: len(t.dims) for t in model.graph.initializer}
        for p in clipped:
            _bound(model, p, ranks[p.first.weight], names)
    return CLEReport(tuple((_label(p.first.node), _label(p.second.node)) for p in pairs), sweeps, converged,
                     before, after, labels if relu6 == "relu" else (), absorbed,
                     labels if relu6 != "relu" else ())


def pre_activations(model: ModelProto, relu6: str = "bound") -> list[str]:
    """The tensors ``equalize`` reads ``minima`` for (each pair's W1 output), in graph order."""
    return [p.first.output for p in find_pairs(model, relu6)]


def channel_minima(model: ModelProto, tensors: list[str], samples: Iterable[dict[str, np.ndarray]], *,
                   axes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Per-channel minimum of each of ``tensors`` over all ``samples`` (onnxruntime, float).

    The channel axis is ``axes[name]`` if given, else 1 for a tensor a Conv (or a normalization)
    writes and the last axis otherwise. Example: one sample ``[[1, -2], [3, 4]]`` of a MatMul
    output → ``[1, -2]``. Measure on the model before ``equalize`` (it rescales the bounds)."""
    index = GraphIndex(model.graph)
    axis = {t: (axes or {}).get(t, 1 if getattr(index.producers.get(t), "op_type", "") in CHANNEL_FIRST else -1)
            for t in tensors}
    return reduce_channels(model, tensors, samples, axis, lambda v: v.min(axis=0), np.minimum)


class CrossLayerEqualization:
    """``equalize`` as a graph pass (no bias absorption): ``changed`` when a pair was found;
    the last report is kept on ``report``."""

    name = "cross-layer-equalization"

    def __init__(self, iterations: int = 100, relu6: str = "bound"):
        self.iterations, self.relu6 = iterations, relu6
        self.report: CLEReport | None = None

    def __call__(self, model: ModelProto) -> bool:
        self.report = equalize(model, self.iterations, relu6=self.relu6)
        return self.report.changed
