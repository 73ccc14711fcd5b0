"""Insert QuantizeLinear / DequantizeLinear nodes in the layout onnxruntime fuses.

Activation ``T`` (produced by node P)::

    P → T_float → QuantizeLinear → T_quantized → DequantizeLinear → T → consumers

so every consumer, subgraph captures included, reads the dequantized value under the original
name. A graph input ``X`` gets ``X → Q → DQ → X_dequantized`` and its consumers are rewired.
A folded Relu/Clip is removed and its output is produced by the DQ fed from its input.
Weights become integer initializers read by a DequantizeLinear (``axis`` when per channel);
biases become int32 with ``scale = s_input · s_weight``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from edgequant.errors import ConfigError
from edgequant.ir.graph import NameScope, consumers
from edgequant.ir.model import append_tensor, copy_fields
from edgequant.planning.plan import ActivationPlan, QuantPlan, WeightPlan
from edgequant.quant.assign import weight_params
from edgequant.quant.params import QuantParams, fit_bias, quantize_array, quantize_bias

log = logging.getLogger(__name__)

WeightKey = tuple  # (tensor, axis, dtype, symmetric, scheme, clipping): a weight as a plan quantizes it
RangeKey = tuple  # (root, dtype, symmetric, scheme): an activation as a plan quantizes it


def range_key(act: ActivationPlan) -> RangeKey:
    return (act.root, act.dtype, act.symmetric, act.scheme)


def weight_key(wp: WeightPlan) -> WeightKey:
    return (wp.tensor, wp.axis, wp.dtype, wp.symmetric, wp.scheme, wp.clipping)


def plain_weight(w: np.ndarray, wp: WeightPlan) -> tuple[np.ndarray, QuantParams]:
    """The integer weight and params of ``w`` as ``wp`` rounds it to nearest."""
    return weight_params(w, wp.dtype, wp.symmetric, wp.axis, wp.scheme, wp.clipping)


@dataclass(frozen=True)
class MatMulBias:
    """An Add whose constant operand is the bias of the MatMul in front of it (``y = x·W + b``,
    as exporters write a Linear layer): ``slot`` of the Add holds ``b``."""

    add: NodeProto
    slot: int
    matmul: NodeProto
    weight: WeightPlan

    @property
    def tensor(self) -> str:
        return self.add.input[self.slot]


def matmul_biases(model: ModelProto, plan: QuantPlan) -> dict[str, MatMulBias]:
    """Add name → its ``MatMulBias``, for each MatMul whose planned weight is a 2-D constant
    ``[K, N]``, whose output only that Add reads (and is no graph output), where the Add's other
    operand is a float constant of N values along the last axis (``[N]`` or ``[1, …, 1, N]``)."""
    inits = {t.name: t for t in model.graph.initializer}
    readers = consumers(model.graph)
    outputs = {o.name for o in model.graph.output}
    found: dict[str, MatMulBias] = {}
    for mm in model.graph.node:
        wp = plan.weights.get(mm.name, {}).get(1)
        if mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx") or wp is None or wp.tensor not in inits:
            continue
        dims = list(inits[wp.tensor].dims)
        nxt = readers.get(mm.output[0], [])
        if len(dims) != 2 or len(nxt) != 1 or mm.output[0] in outputs:
            continue
        add = nxt[0]
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2 or \
                add.input[0] == add.input[1]:
            continue
        slot = 1 if add.input[0] == mm.output[0] else 0
        b = inits.get(add.input[slot])
        if b is not None and b.data_type == TensorProto.FLOAT and b.dims and b.dims[-1] == dims[1] and \
                int(np.prod(b.dims)) == dims[1]:
            found[add.name] = MatMulBias(add, slot, mm, wp)
    return found


@dataclass(frozen=True)
class Edits:
    """What accuracy recovery chose, applied where a plan quantizes a weight the same way.

    ``weights``: integer weights picked by a rounding algorithm (AdaRound, GPTQ) with the
    params they were picked for, keyed by ``weight_key``; ``biases``: float values that replace
    a bias initializer (bias correction) where it is quantized with that weight key, or the
    constant of an Add after a MatMul (``matmul_biases``) where the MatMul's weight is. A plan
    that quantizes a weight otherwise (another dtype, float) gets plain rounding and the
    original bias: an edit is only ever used for what it was computed for. ``ranges``: learned
    activation ranges (block reconstruction's step sizes), keyed by ``range_key``; they replace
    the calibrated range of a root quantized that way (``CalibratedModel.ranges``).
    """

    weights: Mapping[WeightKey, tuple[np.ndarray, QuantParams]] = field(default_factory=dict)
    biases: Mapping[tuple[str, WeightKey], np.ndarray] = field(default_factory=dict)
    ranges: Mapping[RangeKey, tuple[float, float]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.weights or self.biases or self.ranges)

    def merged(self, other: Edits) -> Edits:
        """These edits with ``other``'s on top."""
        return Edits({**self.weights, **other.weights}, {**self.biases, **other.biases},
                     {**self.ranges, **other.ranges})


NO_EDITS = Edits()


class _Inserter:
    def __init__(self, model: ModelProto, source: ModelProto, plan: QuantPlan,
                 params: dict[str, QuantParams], edits: Edits = NO_EDITS):
        self.model, self.plan, self.params, self.edits = model, plan, params, edits
        self.graph = model.graph
        self.inits = {t.name: t for t in source.graph.initializer}
        self.scope = NameScope(self.graph)
        self.scope.taken |= set(self.inits)
        self.new_inits: list[TensorProto] = []
        self.qparam_names: dict[str, tuple[str, str]] = {}
        self.weight_cache: dict[tuple, tuple[str, QuantParams]] = {}
        self.bias_cache: dict[tuple, str] = {}
        self.clipped_bias = 0
        # Add → (slot, corrected bias of the MatMul before it), where this plan quantizes that
        # MatMul's weight as the correction was measured for
        self.add_biases: dict[str, tuple[int, np.ndarray]] = {}
        if edits.biases:
            for name, mb in matmul_biases(source, plan).items():
                value = edits.biases.get((mb.tensor, weight_key(mb.weight)))
                if value is not None:
                    self.add_biases[name] = (mb.slot, value)

    def const(self, base: str, arr: np.ndarray) -> str:
        name = self.scope.fresh(base)
        self.new_inits.append(numpy_helper.from_array(arr, name))
        return name

    def act_qparams(self, root: str) -> tuple[str, str]:
        if root not in self.qparam_names:
            p = self.params[root]
            self.qparam_names[root] = (
                self.const(f"{root}_scale", np.asarray(p.scale, np.float32).reshape(())),
                self.const(f"{root}_zero_point", np.asarray(p.zero_point).reshape(())),
            )
        return self.qparam_names[root]

    def qdq_pair(self, act: ActivationPlan, src: str, dst: str) -> list[NodeProto]:
        scale, zp = self.act_qparams(act.root)
        q_out = self.scope.fresh(f"{act.tensor}_quantized")
        return [
            helper.make_node("QuantizeLinear", [src, scale, zp], [q_out],
                             name=self.scope.fresh(f"{act.tensor}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q_out, scale, zp], [dst],
                             name=self.scope.fresh(f"{act.tensor}_DequantizeLinear")),
        ]

    def run(self) -> None:
        graph_inputs = {i.name for i in self.graph.input}
        folded = self.plan.folded_nodes
        by_tensor = self.plan.activations
        out_nodes: list[NodeProto] = []
        rename_inputs: dict[str, str] = {}
        for name in [i.name for i in self.graph.input]:
            act = by_tensor.get(name)
            if act is not None:
                dq = self.scope.fresh(f"{name}_dequantized")
                out_nodes += self.qdq_pair(act, name, dq)
                rename_inputs[name] = dq
        folds: dict[str, list[NodeProto]] = {}  # a folded Relu's input → the Relu
        for n in self.graph.node:
            if n.name in folded:
                folds.setdefault(n.input[0], []).append(n)
        for node in self.graph.node:
            for i, inp in enumerate(node.input):
                if inp in rename_inputs:
                    node.input[i] = rename_inputs[inp]
            if node.name in folded:
                continue
            out_nodes += self.weight_nodes(node)
            self.float_bias(node)
            out_nodes.append(node)
            for k, out in enumerate(node.output):
                act = by_tensor.get(out)
                if act is not None and out not in graph_inputs:
                    float_name = self.scope.fresh(f"{out}_float")
                    node.output[k] = float_name
                    out_nodes += self.qdq_pair(act, float_name, out)
                for relu in folds.pop(out, ()):
                    if relu.output[0] in by_tensor:
                        out_nodes += self.qdq_pair(by_tensor[relu.output[0]], node.output[k], relu.output[0])
        self.graph.ClearField("node")
        self.graph.node.extend(out_nodes)
        self._attach_initializers()
        if self.clipped_bias:
            log.warning("%d bias values overflowed int32 and were clipped", self.clipped_bias)

    def _attach_initializers(self) -> None:
        """Original weights still read (in their order), then the new ones; nothing copied twice."""
        used = set(consumers(self.graph)) | {o.name for o in self.graph.output}
        for t in self.inits.values():
            if t.name in used:
                append_tensor(self.graph.initializer, t)
        self.graph.initializer.extend(self.new_inits)
        dropped = set(self.inits) - used
        if dropped:
            inputs = [i for i in self.graph.input if i.name not in dropped]
            self.graph.ClearField("input")
            self.graph.input.extend(inputs)

    def float_bias(self, node: NodeProto) -> None:
        """A corrected MatMul bias that this plan leaves float: a new initializer for the Add."""
        slot, value = self.add_biases.get(node.name, (-1, None))
        if value is not None and slot not in self.plan.weights.get(node.name, {}):
            node.input[slot] = self.const(f"{node.input[slot]}_corrected", np.asarray(value, np.float32))

    def weight_nodes(self, node: NodeProto) -> list[NodeProto]:
        made: list[NodeProto] = []
        for slot, wp in self.plan.weights.get(node.name, {}).items():
            bias = self._bias_for(node)
            key = (wp.tensor, wp.axis, wp.dtype, wp.symmetric, wp.clipping) + (bias or ())
            corrected = self.add_biases.get(node.name, (-1, None))
            if corrected[0] == slot:  # a corrected MatMul bias quantized as a constant operand
                key += (node.name,)
            if key not in self.weight_cache:
                w = numpy_helper.to_array(self.inits[wp.tensor]) if corrected[0] != slot else \
                    np.asarray(corrected[1], np.float32)
                chosen = self.edits.weights.get(weight_key(wp))
                q, p = chosen if chosen is not None else plain_weight(w, wp)
                if bias is not None:  # keep the bias from overflowing its accumulator
                    fitted = fit_bias(p, self._bias_value(bias[0], wp), bias[1], wp.scheme)
                    if fitted is not None:
                        p, q = fitted, quantize_array(w, fitted, wp.scheme)
                        _check_fit(node, w, q, wp)
                dq_out = self.scope.fresh(f"{wp.tensor}_dequantized")
                made.append(self.dq_node(wp.tensor, q, p, dq_out))
                self.weight_cache[key] = (dq_out, p)
            node.input[slot] = self.weight_cache[key][0]
            made += self.bias_nodes(node, key, wp.scheme)
        return made

    def _bias_for(self, node: NodeProto) -> tuple[str, float] | None:
        """(bias tensor, input scale) of the node's int32 bias, if it has one."""
        for bp in self.plan.biases.get(node.name, {}).values():
            root = self.plan.activations[bp.input_tensor].root
            return bp.tensor, float(np.asarray(self.params[root].scale))
        return None

    def bias_nodes(self, node: NodeProto, wkey: tuple, scheme) -> list[NodeProto]:
        made = []
        for slot, bp in self.plan.biases.get(node.name, {}).items():
            in_root = self.plan.activations[bp.input_tensor].root
            key = (bp.tensor, in_root, wkey)
            if key not in self.bias_cache:
                b = self._bias_value(bp.tensor, bp.weight)
                w_scale = self.weight_cache[wkey][1].scale
                s_in = float(np.asarray(self.params[in_root].scale))
                q, scale, clipped = quantize_bias(b, s_in, np.asarray(w_scale), scheme)
                self.clipped_bias += clipped
                axis = 0 if scale.ndim == 1 and scale.size > 1 else None
                p = QuantParams(scale if axis is not None else scale.reshape(()),
                                np.zeros_like(scale, dtype=np.int32) if axis is not None else np.zeros((), np.int32),
                                None, axis)  # type: ignore[arg-type]
                dq_out = self.scope.fresh(f"{bp.tensor}_dequantized")
                made.append(self.dq_node(bp.tensor, q, p, dq_out))
                self.bias_cache[key] = dq_out
            node.input[slot] = self.bias_cache[key]
        return made

    def _bias_value(self, tensor: str, wp: WeightPlan) -> np.ndarray:
        edited = self.edits.biases.get((tensor, weight_key(wp)))
        return edited if edited is not None else numpy_helper.to_array(self.inits[tensor])

    def typed_const(self, base: str, arr: np.ndarray, dtype) -> str:
        name = self.scope.fresh(base)
        self.new_inits.append(dtype.tensor(name, arr))
        return name

    def dq_node(self, base: str, q: np.ndarray, p: QuantParams, out: str) -> NodeProto:
        scale = np.asarray(p.scale, np.float32)
        zp = np.asarray(p.zero_point)
        if p.dtype is not None and p.dtype.bits == 4:  # packed 4-bit initializers
            q_name = self.typed_const(f"{base}_quantized", q, p.dtype)
        else:
            q_name = self.const(f"{base}_quantized", q)
        s_name = self.const(f"{base}_scale", scale if p.axis is not None else scale.reshape(()))
        zp = zp if p.axis is not None else zp.reshape(())
        if p.dtype is not None and p.dtype.bits == 4:
            z_name = self.typed_const(f"{base}_zero_point", zp, p.dtype)
        else:
            z_name = self.const(f"{base}_zero_point", zp)
        node = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out],
                                name=self.scope.fresh(f"{base}_DequantizeLinear"))
        if p.axis is not None:
            node.attribute.append(helper.make_attribute("axis", p.axis))
        return node


def _check_fit(node: NodeProto, w: np.ndarray, q: np.ndarray, wp) -> None:
    """Raising a scale for the bias must not wipe out a channel that has real weights."""
    axis = wp.axis
    rows_w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if axis is not None else w.reshape(1, -1)
    rows_q = np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1) if axis is not None else q.reshape(1, -1)
    lost = np.flatnonzero((np.abs(rows_w).max(axis=1) > 0) & ((rows_q != 0).sum(axis=1) == 0))
    if lost.size and wp.scheme.bias_bits < 32:
        raise ConfigError(
            f"the bias of {node.name} (channel {int(lost[0])}) needs more than {wp.scheme.bias_bits} bits at this "
            f"input scale: its weights would all round to 0; keep it wider (--override {node.name}=float) or "
            "use a target with a wider bias")


def insert_qdq(model: ModelProto, plan: QuantPlan, params: dict[str, QuantParams],
               edits: Edits = NO_EDITS) -> ModelProto:
    """Return a new model: ``model`` with Q/DQ nodes for everything in ``plan`` (and the
    weights and biases recovery chose, ``edits``).

    The float weights that get quantized are never copied; the input model is not modified.
    """
    out = ModelProto()
    copy_fields(model, out, skip="graph")
    copy_fields(model.graph, out.graph, skip="initializer")
    out.graph.ClearField("value_info")
    _Inserter(out, model, plan, params, edits).run()
    return out
