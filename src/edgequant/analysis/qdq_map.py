"""Read which inputs of which float nodes a QDQ model quantizes, and with what parameters.

The map is built from graph structure only: a node of the QDQ model that also exists (same
node name) in the float model reads, at input slot ``s``, either a plain tensor or the output
of a ``DequantizeLinear``. In the second case that float node's slot ``s`` is quantized:

* ``DequantizeLinear(QuantizeLinear(x))`` — an activation (its float reference is the tensor
  the float node reads at ``s``);
* ``DequantizeLinear(integer initializer)`` — a weight, or an int32 bias.

This works for edgequant's models (``result.float_model`` + ``result.model``) and for QDQ
models written by other tools, as long as node names survive quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, NodeProto, numpy_helper

from edgequant.ir.graph import get_attr, initializers, producers


@dataclass(frozen=True)
class EdgeQuant:
    """Slot ``slot`` of float node ``node`` is quantized: ``tensor`` (float model) is replaced
    by ``quant_tensor`` (the QDQ model's DequantizeLinear output)."""

    node: str
    slot: int
    tensor: str
    quant_tensor: str
    kind: str  # "activation", "weight" or "bias"
    dq_node: str
    q_node: str | None


@dataclass
class QuantMap:
    """Quantized edges by float node name (nodes in the float model's order)."""

    edges: dict[str, list[EdgeQuant]] = field(default_factory=dict)

    def activations(self) -> dict[str, str]:
        """Quantized tensor (QDQ model) → float reference tensor, one entry per DQ output."""
        out: dict[str, str] = {}
        for edges in self.edges.values():
            for e in edges:
                if e.kind == "activation":
                    out.setdefault(e.quant_tensor, e.tensor)
        return out

    def __len__(self) -> int:
        return sum(len(v) for v in self.edges.values())


def _is(node: NodeProto | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx", "com.microsoft")


def read_quant_map(float_model: ModelProto, qmodel: ModelProto) -> QuantMap:
    """The quantized edges of ``qmodel`` expressed on ``float_model``'s nodes."""
    qprod = producers(qmodel.graph)
    qinits = initializers(qmodel.graph)
    qnodes = {n.name: n for n in qmodel.graph.node if n.name}
    result = QuantMap()
    for fnode in float_model.graph.node:
        qnode = qnodes.get(fnode.name)
        if not fnode.name or qnode is None or qnode.op_type != fnode.op_type:
            continue
        edges = []
        for slot, (ftensor, qtensor) in enumerate(zip(fnode.input, qnode.input)):
            dq = qprod.get(qtensor)
            if not ftensor or dq is None or not _is(dq, "DequantizeLinear"):
                continue
            src = dq.input[0]
            q = qprod.get(src)
            if q is not None and _is(q, "QuantizeLinear"):
                edges.append(EdgeQuant(fnode.name, slot, ftensor, qtensor, "activation", dq.name, q.name))
            elif src in qinits:
                kind = "bias" if qinits[src].data_type == 6 else "weight"  # int32 → bias
                edges.append(EdgeQuant(fnode.name, slot, ftensor, qtensor, kind, dq.name, None))
        if edges:
            result.edges[fnode.name] = edges
    return result


def dequantized_weight(qmodel: ModelProto, dq_name: str) -> np.ndarray:
    """The float values a weight DequantizeLinear produces: ``(q − z)·s`` along its axis."""
    node = next(n for n in qmodel.graph.node if n.name == dq_name)
    inits = initializers(qmodel.graph)
    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
    s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    z = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
         if len(node.input) > 2 and node.input[2] else np.zeros_like(s))
    if s.ndim == 1 and s.size > 1:
        shape = [1] * q.ndim
        axis = get_attr(node, "axis", 1)
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return ((q - z) * s).astype(np.float32)


def weight_match_score(float_model: ModelProto, qmodel: ModelProto, qmap: QuantMap) -> int:
    """How many quantized weights of ``qmodel`` are close to ``float_model``'s weights (used to
    pick between a float model as given and its prepared, BatchNorm-folded form)."""
    finits = initializers(float_model.graph)
    score = 0
    for edges in qmap.edges.values():
        for e in edges:
            if e.kind != "weight" or e.tensor not in finits:
                continue
            w = numpy_helper.to_array(finits[e.tensor])
            d = dequantized_weight(qmodel, e.dq_node)
            if w.shape == d.shape:
                err = float(np.sum((w - d) ** 2))
                score += int(err <= 0.01 * float(np.sum(w.astype(np.float64) ** 2)))
    return score
