"""Build the QuantPlan: for every tensor, whether and how it is quantized.

The plan is the single source of truth read by calibration (which tensors to observe),
parameter assignment, Q/DQ insertion and the summary. No stage parses tensor names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from edgequant.ir.graph import (
    consumers,
    count_subgraph_nodes,
    elem_types,
    has_subgraph,
    static_shapes,
)
from edgequant.planning.ops import ALL, OpFacts, facts_for, weight_axis
from edgequant.planning.options import QuantOptions
from edgequant.planning.overrides import FLOAT, Override, apply_overrides
from edgequant.planning.selectors import ExactNodes
from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import DEFAULT_SCHEME, Scheme


@dataclass(frozen=True)
class ActivationPlan:
    """An activation tensor that receives QuantizeLinear → DequantizeLinear.

    ``root`` is the tensor whose calibrated range it uses (itself unless it shares with an
    upstream tensor through a reshape-like op). ``source`` is the tensor the QuantizeLinear
    reads: the tensor itself, or the producer's output when a Relu/Clip is folded away.
    """

    tensor: str
    root: str
    source: str
    dtype: QuantDType
    symmetric: bool
    scheme: Scheme = DEFAULT_SCHEME


@dataclass(frozen=True)
class WeightPlan:
    tensor: str
    dtype: QuantDType
    symmetric: bool
    axis: int | None
    scheme: Scheme = DEFAULT_SCHEME
    clipping: float | None = None  # a fixed share of each channel's range instead of the MSE search


@dataclass(frozen=True)
class BiasPlan:
    tensor: str
    input_tensor: str
    weight: WeightPlan


@dataclass
class QuantPlan:
    """Every quantized tensor, keyed the way it is read: activations by tensor name, weights and
    biases by node name then input slot (``plan.weights[node][slot]``)."""

    activations: dict[str, ActivationPlan] = field(default_factory=dict)
    weights: dict[str, dict[int, WeightPlan]] = field(default_factory=dict)
    biases: dict[str, dict[int, BiasPlan]] = field(default_factory=dict)
    folded_nodes: dict[str, str] = field(default_factory=dict)
    fused: dict[str, str] = field(default_factory=dict)  # node → the node the target runs it inside
    float_nodes: set[str] = field(default_factory=set)  # nodes with a float output that stay float
    quantized_ops: Counter = field(default_factory=Counter)
    float_ops: Counter = field(default_factory=Counter)
    subgraph_float_ops: int = 0
    precision: dict[str, str] = field(default_factory=dict)
    narrow_convs: tuple[str, ...] = ()  # Convs left float for onnxruntime's speed (``narrow_convs``)
    calibration: dict[str, tuple] = field(default_factory=dict)  # root → (Method, percentile or None)
    pinned: dict[str, tuple[float, float]] = field(default_factory=dict)  # root → range given by the user

    @property
    def observed(self) -> list[str]:
        """Roots whose range calibration must measure (pinned ones are known)."""
        return [r for r in self.roots if r not in self.pinned]

    @property
    def roots(self) -> list[str]:
        """Tensors to observe during calibration, in graph order, without repeats."""
        return list(dict.fromkeys(a.root for a in self.activations.values()))

    def members(self) -> dict[str, list[str]]:
        """Root → the activations that share its parameters (itself included), in graph order."""
        groups: dict[str, list[str]] = {}
        for a in self.activations.values():
            groups.setdefault(a.root, []).append(a.tensor)
        return groups

    def weight_items(self) -> Iterator[tuple[tuple[str, int], WeightPlan]]:
        """((node, slot), plan) of every weight, nodes in graph order."""
        return (((node, slot), wp) for node, slots in self.weights.items() for slot, wp in slots.items())

    def bias_items(self) -> Iterator[tuple[tuple[str, int], BiasPlan]]:
        return (((node, slot), bp) for node, slots in self.biases.items() for slot, bp in slots.items())


def _attrs(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


#: Ops whose constant operands the generic target quantizes (``_Builder.plan_constants``).
CONSTANT_OPERAND_OPS = ("Add", "Mul")

#: What a target's compiler may run as one op, quantized once (``QuantOptions.fusions``):
#: the producer's output gets no quantization of its own, the fused op's output does.
FUSIONS = ("relu", "pad", "bias", "silu")

#: Ops ``quantize_all_ops`` still leaves alone: control flow, and ops on shapes, types or indices.
_NEVER = {"If", "Loop", "Scan", "Identity", "Dropout", "Constant", "ConstantOfShape", "Shape", "Size", "Cast",
          "CastLike", "Range", "NonZero", "NonMaxSuppression", "TopK", "ArgMax", "ArgMin", "EyeLike",
          "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}
_ANY = OpFacts("compute", ALL)
#: ``Min(x, constant)``: its values lie within x's range, so it shares x's parameters.
_BOUNDED = OpFacts("shared")


class _Builder:
    def __init__(self, model: ModelProto, options: QuantOptions):
        self.graph = model.graph
        self.opt = options
        self.types = elem_types(self.graph)
        self.inits = {t.name: t for t in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self.cons = consumers(self.graph)
        self.plan = QuantPlan()
        self.quantized: set[str] = set()
        self.root: dict[str, str] = {}
        self.source: dict[str, str] = {}

    def facts(self, node: NodeProto) -> OpFacts | None:
        if node.op_type == "Min" and node.domain in ("", "ai.onnx") and len(node.input) == 2 \
                and node.input[1] in self.inits:
            return _BOUNDED  # a clamp from above by constants (CLE's per-channel ReLU6 bound)
        facts = facts_for(node.op_type, node.domain)
        if facts is None and self.opt.quantize_all_ops and node.domain in ("", "ai.onnx") and node.op_type not in _NEVER:
            return _ANY
        return facts

    def is_float_activation(self, name: str) -> bool:
        return bool(name) and name not in self.inits and self.types.get(name) == TensorProto.FLOAT

    def requested(self, name: str) -> bool:
        """Does some consumer want this tensor quantized as an activation input?"""
        fused = self.fused_into(name)
        for node in self.cons.get(name, []):
            facts = self.facts(node)
            if facts is None or facts.kind == "shared" or node is fused:
                continue
            if facts.kind == "relu" and self.folding_relu(name) is node:
                continue
            slots = [i for i, n in enumerate(node.input) if n == name]
            if any(s in facts.act_inputs and s != self._weight_slot(node, facts) for s in slots):
                return True
        return False

    def _weight_slot(self, node: NodeProto, facts) -> int | None:
        w = facts.weight_input
        if w is None or w >= len(node.input):
            return None
        name = node.input[w]
        if name in self.inits and self.inits[name].data_type == TensorProto.FLOAT:
            return w
        return None

    def mark(self, name: str, root: str | None = None, source: str | None = None) -> None:
        if name in self.quantized or not self.is_float_activation(name):
            return
        if name in self.outputs and not self.opt.quantize_outputs:
            return
        self.quantized.add(name)
        self.root[name] = self.root.get(root, root) if root else name
        self.source[name] = source or name

    def folding_relu(self, x: str) -> NodeProto | None:
        """The Relu / Clip(min=0) that reads ``x`` when it can absorb ``x``'s quantization.

        Folding is exact for asymmetric activations: the range of the Relu output starts at 0,
        so the zero point sits at qmin and QuantizeLinear's saturation performs the Relu.
        """
        if self.opt.activation_symmetric or x in self.outputs:
            return None
        readers = self.cons.get(x, [])
        if len(readers) != 1 or readers[0].op_type not in ("Relu", "Clip"):
            return None
        node = readers[0]
        if node.domain not in ("", "ai.onnx") or node.input[0] != x:
            return None
        if node.op_type == "Clip" and self._clip_min(node) != 0.0:
            return None
        prod = self.producer.get(x)
        facts = self.facts(prod) if prod is not None else None
        return node if facts is not None and facts.kind in ("weighted", "compute") else None

    def fused_into(self, x: str) -> NodeProto | None:
        """The node the target's compiler runs ``x``'s producer inside (``QuantOptions.fusions``):
        ``x`` then gets no quantization of its own and the fused node's output is quantized.
        Unlike ``folding_relu`` the node stays in the QDQ model, computing what the fused op does.

        * relu: a Relu / Clip(min=0) after a weighted or compute op (Conv+Relu, Conv+Relu6);
        * bias: an Add of a constant after a Conv, ConvTranspose, MatMul or Gemm;
        * silu: the ``Mul`` of ``x · Sigmoid(x)`` reading the Sigmoid's output ``x``.
        """
        fusions = self.opt.fusions
        if not fusions or x in self.outputs or x in self.inits:
            return None
        readers = self.cons.get(x, [])
        if len(readers) != 1 or readers[0].domain not in ("", "ai.onnx"):
            return None
        node, prod = readers[0], self.producer.get(x)
        facts = self.facts(prod) if prod is not None else None
        if prod is None or facts is None:
            return None
        if "relu" in fusions and node.op_type in ("Relu", "Clip") and node.input[0] == x:
            if facts.kind in ("weighted", "compute") and (node.op_type == "Relu" or self._clip_min(node) == 0.0):
                return node
        if "bias" in fusions and node.op_type == "Add" and len(node.input) == 2 and \
                prod.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and self._weight_slot(prod, facts) is not None:
            other = node.input[1] if node.input[0] == x else node.input[0]
            if other in self.inits and other != x:
                return node
        if "silu" in fusions and prod.op_type == "Sigmoid" and node.op_type == "Mul" and \
                sorted(node.input) == sorted([x, prod.input[0]]) and prod.input[0] != x:
            return node
        return None

    def _clip_min(self, node: NodeProto) -> float | None:
        if len(node.input) > 1 and node.input[1]:
            t = self.inits.get(node.input[1])
            return float(numpy_helper.to_array(t)) if t is not None else None
        return float(_attrs(node).get("min", -3.4e38))

    def build(self) -> QuantPlan:
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        for inp in self.graph.input:
            if self.requested(inp.name):
                self.mark(inp.name)
        for node in self.graph.node:
            self.visit(node)
        self.finish()
        return self.plan

    def visit(self, node: NodeProto) -> None:
        if has_subgraph(node):
            self.plan.subgraph_float_ops += count_subgraph_nodes(node)
        facts = self.facts(node)
        for name in node.input:
            if name and self.requested(name) and name not in self.quantized:
                self.mark(name)
        if facts is None:
            self.plan.float_ops[node.op_type] += 1
            self._float_node(node)
            return
        outs = [o for o in node.output if o]
        if facts.kind == "shared":
            src = node.input[0] if node.input else ""
            for out in outs:
                if src in self.quantized:
                    self.mark(out, root=src)
                elif self.requested(out):
                    self.mark(out)
        elif facts.kind == "relu" and self.folding_relu(node.input[0]) is node:
            self.mark(outs[0], source=node.input[0])
            if outs[0] in self.quantized:
                self.plan.folded_nodes[node.name] = node.input[0]
        elif node.op_type in self.opt.float_output_ops:
            pass  # the chip hands this output over in float
        else:
            for out in outs:
                if self.fused_into(out) is not None:
                    self.plan.fused[node.name] = self.fused_into(out).name  # type: ignore[union-attr]
                elif self.folding_relu(out) is None:
                    self.mark(out)
        if facts.kind == "weighted":
            self.plan_weights(node, facts)
        elif node.op_type in CONSTANT_OPERAND_OPS and self.opt.quantize_constants:
            self.plan_constants(node)
        if node.op_type in self.opt.unit_range_ops:
            for out in outs:
                if out in self.quantized and self.root.get(out, out) == out:
                    self.plan.pinned[out] = (0.0, 1.0)
        weighted = node.name in self.plan.weights
        folded = node.name in self.plan.folded_nodes
        if folded:
            self.plan.quantized_ops[f"{node.op_type} (folded)"] += 1
        elif node.name in self.plan.fused and not weighted:
            self.plan.quantized_ops[f"{node.op_type} (fused)"] += 1
        elif weighted or any(o in self.quantized for o in outs):
            self.plan.quantized_ops[node.op_type] += 1
        else:
            self.plan.float_ops[node.op_type] += 1
            self._float_node(node)

    def _float_node(self, node: NodeProto) -> None:
        if any(self.types.get(o) == TensorProto.FLOAT for o in node.output if o):
            self.plan.float_nodes.add(node.name)

    def plan_constants(self, node: NodeProto) -> None:
        """A float constant beside a quantized activation (``x + 3``, ``γ · x``) gets the
        activations' dtype and its own exact range, so onnxruntime fuses the op into an integer
        kernel (QLinearAdd/QLinearMul need every input 8-bit). Constants of one or a few
        values are exact at 8 bits; a per-channel vector (a layer norm's β) rounds to 1/255 of
        its range."""
        quantized = [i for i in node.input if i in self.quantized]
        written = any(o in self.quantized or self.folding_relu(o) is not None for o in node.output)
        if not quantized or not written:  # (a Relu/Clip that folds into the output: ORT drops it)
            return
        for slot, name in enumerate(node.input):
            t = self.inits.get(name)
            if t is None or t.data_type != TensorProto.FLOAT or not numpy_helper.to_array(t).size:
                continue
            self.plan.weights.setdefault(node.name, {})[slot] = WeightPlan(
                name, self.opt.activation_dtype, self.opt.activation_symmetric, None, self.opt.scheme, 1.0)

    def plan_weights(self, node: NodeProto, facts) -> None:
        slot = self._weight_slot(node, facts)
        if slot is None:
            return
        per_channel = self.opt.per_channel and (self.opt.per_channel_ops is None or node.op_type in self.opt.per_channel_ops)
        attrs = _attrs(node)
        wplan = None
        for s in (slot, *facts.extra_weights):
            t = self.inits.get(node.input[s]) if s < len(node.input) else None
            if t is None or t.data_type != TensorProto.FLOAT:
                continue
            axis = weight_axis(node.op_type, len(t.dims), attrs) if per_channel else None
            wp = WeightPlan(t.name, self.opt.weight_dtype, self.opt.weight_symmetric, axis, self.opt.scheme,
                            self.opt.weight_clipping_ratio)
            self.plan.weights.setdefault(node.name, {})[s] = wp
            wplan = wplan or wp
        assert wplan is not None
        w, axis = self.inits[node.input[slot]], wplan.axis
        b = facts.bias_input
        if b is None or b >= len(node.input) or node.input[b] not in self.inits:
            return
        bias = self.inits[node.input[b]]
        channels = w.dims[axis] if axis is not None else None
        if bias.data_type != TensorProto.FLOAT or len(bias.dims) != 1:
            return
        if channels is not None and bias.dims[0] != channels:
            return
        if numpy_helper.to_array(bias).size == 0:
            return
        x = node.input[facts.act_inputs[0]]
        if x in self.quantized:
            self.plan.biases.setdefault(node.name, {})[b] = BiasPlan(bias.name, x, wplan)

    def tie_inputs(self) -> None:
        """An input read only by an op of ``tied_inputs`` shares the op's output parameters
        (its whole group: upstream Reshapes and the like follow)."""
        def find(t: str) -> str:
            while self.root.get(t, t) != t:
                t = self.root[t]
            return t

        for node in self.graph.node:
            out = node.output[0] if node.output else ""
            fused = self.fused_into(out) if out and node.op_type in self.opt.tied_inputs else None
            while fused is not None and out not in self.quantized:  # Add+Relu: the Relu's output
                out = fused.output[0]
                fused = self.fused_into(out)
            if node.op_type not in self.opt.tied_inputs or out not in self.quantized:
                continue
            for t in dict.fromkeys(node.input):
                if t in self.quantized and t in self.producer and t not in self.outputs and \
                        len(self.cons.get(t, [])) == 1 and find(t) != find(out):
                    self.root[find(t)] = find(out)

    def finish(self) -> None:
        self.tie_inputs()
        act, sym = self.opt.activation_dtype, self.opt.activation_symmetric
        order = [i.name for i in self.graph.input] + [o for n in self.graph.node for o in n.output]
        for name in order:
            if name in self.quantized:
                root = self.root[name]
                while self.root.get(root, root) != root:
                    root = self.root[root]
                self.plan.activations[name] = ActivationPlan(name, root, self.source[name], act, sym, self.opt.scheme)


def build_plan(model: ModelProto, options: QuantOptions, source: GraphProto | None = None) -> QuantPlan:
    """Decide, for a prepared model, which tensors are quantized and how (``source``: the
    user's graph before the passes, for overrides that name its tensors)."""
    name_nodes(model)
    plan = _Builder(model, options).build()
    if options.float_narrow_convs:
        narrow = tuple(n for n in narrow_convs(model, options.float_narrow_convs) if n in plan.weights)
        if narrow:
            apply_overrides(plan, model, [Override(ExactNodes(narrow), FLOAT)], options)
            plan.narrow_convs = narrow
    if options.overrides:
        apply_overrides(plan, model, options.overrides, options, source)
    return plan


#: ``narrow_convs`` leaves out Convs smaller than this (MACs per sample at the shapes shape
#: inference knows): on a small feature map the DequantizeLinear/QuantizeLinear around a float
#: Conv cost about what its faster kernel saves.
NARROW_CONV_MACS = 1_000_000


#: ``narrow_convs``: the integer GEMM a QLinearConv becomes is thin below these: columns
#: ``C·kh·kw`` (an image stem: 27) or output channels (a single filter: 1).
THIN_COLUMNS = 64
THIN_OUTPUTS = 8


def narrow_convs(model: ModelProto, channels: int) -> list[str]:
    """Convs (group 1, constant weight) that read fewer than ``channels`` input channels, whose
    integer GEMM is thin (fewer than ``THIN_COLUMNS`` columns or ``THIN_OUTPUTS`` output
    channels), and that compute at least ``NARROW_CONV_MACS`` per sample (or on spatial sizes
    not known before the data): onnxruntime runs these faster in float than as QLinearConv.

    Its float Conv has a direct kernel for few input channels (MLAS NCHWc, e.g. an image stem
    reading 3 channels); QLinearConv unrolls the input (im2col) and multiplies it by a matrix of
    ``C·kh·kw`` rows and one column per output channel. Measured on one thread (AVX-512 VNNI
    host), int8 against float: the 3→32 and 3→16 3×3 stems of EfficientNet-Lite0 and PP-LCNet
    4-4.5× slower, ddddocr's 1→24 3×3 stem 3.6×, basic-pitch's 1→1 256-tap filters 5-12× and
    its 1→32 7×7 Conv 3× slower; its 1→36 256-tap filters run as fast either way (a GEMM of 256
    columns and 36 outputs), its 8→32 5×5 Conv 1.6× faster in int8. Depthwise Convs (group =
    channels) have an integer kernel of their own and stay.
    """
    inits = {t.name: t for t in model.graph.initializer}
    shapes = static_shapes(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2 \
                or node.input[1] not in inits:
            continue
        dims = list(inits[node.input[1]].dims)
        if len(dims) < 3 or _attrs(node).get("group", 1) != 1 or dims[1] >= channels:
            continue
        if int(np.prod(dims[1:])) >= THIN_COLUMNS and dims[0] >= THIN_OUTPUTS:
            continue
        out = shapes.get(node.output[0])
        spatial = [d for d in out[2:] if isinstance(d, int) and d > 0] if out is not None and len(out) == len(dims) \
            else []
        if out is not None and len(spatial) == len(dims) - 2:
            macs = dims[0] * int(np.prod(dims[1:])) * int(np.prod(spatial))
            if macs < NARROW_CONV_MACS:
                continue
        found.append(node.name)
    return found


def narrow_note(plan: QuantPlan, channels: int) -> list[str]:
    """The summary's line for the Convs ``narrow_convs`` left float, if any."""
    names = plan.narrow_convs
    if not names:
        return []
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    one = len(names) == 1
    return [f"{len(names)} Conv{'' if one else 's'} reading fewer than {channels} input channels "
            f"{'stays' if one else 'stay'} float, as onnxruntime runs {'it' if one else 'them'} faster than in "
            f"int8 ({shown}; --quantize-narrow-convs quantizes {'it' if one else 'them'})"]


def name_nodes(model: ModelProto) -> None:
    """Give every unnamed node a deterministic unique name (``<OpType>_<index>``)."""
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.op_type}_{i}"
        name, k = base, 1
        while name in taken or name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
