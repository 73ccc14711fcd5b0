"""What a layer costs: multiply-accumulates, from the shapes the float model actually ran with.

Conv/ConvTranspose: output elements × (input channels / group) × kernel area;
Gemm/MatMul: output elements × the reduced dimension; LSTM/GRU/RNN: steps × batch ×
directions × gates·hidden × (inputs + hidden); any other op: its output elements
(one operation each). The share of a set of layers is their MACs over all quantized layers'.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import ModelProto, NodeProto

from edgequant.ir.graph import get_attr, initializers


def _shape(name: str, values: dict[str, np.ndarray], inits: dict) -> tuple[int, ...] | None:
    if name in values:
        return tuple(values[name].shape)
    if name in inits:
        return tuple(inits[name].dims)
    return None


def node_macs(node: NodeProto, values: dict[str, np.ndarray], inits: dict) -> int:
    """The node's MACs from the shapes in ``values`` (0 when they are not known)."""
    if node.op_type in ("LSTM", "GRU", "RNN") and len(node.input) > 2:
        x, w = _shape(node.input[0], values, inits), _shape(node.input[1], values, inits)
        if x and w and len(x) == 3 and len(w) == 3:  # X: [steps, batch, in] (or batch first); W: [dirs, gH, in]
            return x[0] * x[1] * w[0] * w[1] * (w[2] + w[1] // {"LSTM": 4, "GRU": 3, "RNN": 1}[node.op_type])
    if node.op_type == "Gemm" and len(node.input) > 1:
        a, b = _shape(node.input[0], values, inits), _shape(node.input[1], values, inits)
        if a and b and len(a) == 2 and len(b) == 2:
            m, k = (a[1], a[0]) if get_attr(node, "transA", 0) else (a[0], a[1])
            n = b[0] if get_attr(node, "transB", 0) else b[1]
            return m * n * k
    out = _shape(node.output[0], values, inits) if node.output and node.output[0] else None
    if out is None:
        return 0
    n_out = math.prod(out)
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        w = _shape(node.input[1], values, inits)
        if w is None:
            return n_out
        if node.op_type == "Conv":  # W: [Cout, Cin/group, k...]
            return n_out * math.prod(w[1:])
        cin = _shape(node.input[0], values, inits)  # W: [Cin, Cout/group, k...]
        return (math.prod(cin) if cin else n_out) * math.prod(w[1:])
    if node.op_type in ("Gemm", "MatMul") and node.input:
        a = _shape(node.input[0], values, inits)
        if a:
            k = a[0] if node.op_type == "Gemm" and get_attr(node, "transA", 0) else a[-1]
            return n_out * k
    return n_out


def layer_macs(model: ModelProto, values: dict[str, np.ndarray], names: list[str]) -> dict[str, int]:
    """MACs of the named nodes for one sample's tensors ``values`` (graph inputs included)."""
    inits = initializers(model.graph)
    wanted = set(names)
    return {n.name: node_macs(n, values, inits) for n in model.graph.node if n.name in wanted}


#: Compute ops and the inputs that carry their multiplied operands (activations, weights,
#: recurrent weights).
OPERANDS = {"Conv": (0, 1), "ConvTranspose": (0, 1), "Gemm": (0, 1), "MatMul": (0, 1),
            "LSTM": (0, 1, 2), "GRU": (0, 1, 2), "RNN": (0, 1, 2)}


def eight_bit_macs(float_model: ModelProto, qmodel: ModelProto, values: dict[str, np.ndarray]) -> tuple[int, int]:
    """(MACs whose every operand arrives through an 8-bit DequantizeLinear, all MACs) of the
    compute ops (``OPERANDS``) in the main graph, as a user's NPU runs them: a Conv reading a
    16-bit activation is a 16-bit Conv whatever its weights. MACs come from ``float_model``
    with one sample's tensors ``values`` (their shapes are read); the operands' precision from
    the node of the same name in ``qmodel``. Ops inside If/Loop bodies are not counted."""
    from edgequant.ir.graph import producers as producers_of

    inits = initializers(float_model.graph)
    q_inits = initializers(qmodel.graph)
    prods = producers_of(qmodel.graph)
    quantized = {n.name: n for n in qmodel.graph.node if n.op_type in OPERANDS}
    eight = total = 0
    for node in float_model.graph.node:
        slots = OPERANDS.get(node.op_type)
        if slots is None:
            continue
        macs = node_macs(node, values, inits)
        total += macs
        q = quantized.get(node.name)
        if q is not None and all(_is_8_bit(q.input[k], prods, q_inits) for k in slots
                                 if k < len(q.input) and q.input[k]):
            eight += macs
    return eight, total


def _is_8_bit(name: str, producers: dict[str, NodeProto], inits: dict) -> bool:
    """Is the DequantizeLinear writing ``name`` fed 8-bit integers?"""
    from onnx import TensorProto

    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return False
    q = producers.get(dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear":
        zp = q.input[2] if len(q.input) > 2 and q.input[2] else None
        if zp is None:
            return True  # QuantizeLinear without a zero point writes uint8
        return zp in inits and inits[zp].data_type in (TensorProto.INT8, TensorProto.UINT8)
    return dq.input[0] in inits and inits[dq.input[0]].data_type in (TensorProto.INT8, TensorProto.UINT8)
