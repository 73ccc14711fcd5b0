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
    if node.op_type in ("LSTM", "GRU", "RNN") and len(node.input) > 2:
        x, w = _shape(node.input[0], values, inits), _shape(node.input[1], values, inits)
        if x and w and len(x) == 3 and len(w) == 3:  # X: [steps, batch, in] (or batch first); W: [dirs, gH, in]
            return x[0] * x[1] * w[0] * w[1] * (w[2] + w[1] // {"LSTM": 4, "GRU": 3, "RNN": 1}[node.op_type])
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
