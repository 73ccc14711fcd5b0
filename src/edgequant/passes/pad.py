"""Fold a zero ``Pad`` into the convolutions that read it, as NPU toolchains compile it."""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, NodeProto, helper, numpy_helper

from edgequant.ir.graph import consumers, get_attr, initializers, remove_nodes


def _constant(node: NodeProto, slot: int, inits) -> np.ndarray | None:
    """Input ``slot`` of ``node`` as an array: None when it is not a constant, empty when absent."""
    if slot >= len(node.input) or not node.input[slot]:
        return np.zeros(0)
    t = inits.get(node.input[slot])
    return numpy_helper.to_array(t) if t is not None else None


def _spatial_pads(pad: NodeProto, inits, rank: int | None) -> list[int] | None:
    """The Pad's ``[x1_begin, x2_begin, …, x1_end, …]`` over the spatial axes (2…), when it is a
    constant-zero pad of the spatial axes only, by non-negative amounts; else None."""
    if pad.domain not in ("", "ai.onnx") or get_attr(pad, "mode", b"constant") not in (b"constant", "constant"):
        return None
    if len(pad.input) > 1:  # opset 11+: pads, constant_value, axes as inputs
        pads, value, axes = (_constant(pad, k, inits) for k in (1, 2, 3))
        if pads is None or value is None or axes is None or pads.size == 0:
            return None
    else:
        pads, value, axes = np.array(get_attr(pad, "pads", [])), np.array(get_attr(pad, "value", 0.0)), np.zeros(0)
    if value.size and float(value.reshape(-1)[0]) != 0.0:
        return None
    pads = pads.astype(np.int64).reshape(-1)
    if axes.size:  # opset 18: pads for the listed axes only
        if rank is None or pads.size != 2 * axes.size:
            return None
        full = np.zeros(2 * rank, np.int64)
        for k, a in enumerate(axes.astype(np.int64).reshape(-1) % rank):
            full[a], full[a + rank] = pads[k], pads[k + axes.size]
        pads = full
    n = pads.size // 2
    if n < 3 or pads.size != 2 * n or np.any(pads < 0):
        return None
    begin, end = pads[:n], pads[n:]
    if begin[0] or begin[1] or end[0] or end[1]:
        return None
    return [int(v) for v in (*begin[2:], *end[2:])]


class FoldPadIntoConv:
    """``x → Pad(0) → Conv`` becomes ``x → Conv(pads + pad)``: exact, as the Conv's own padding
    is zeros too. Applies to a constant-zero Pad of the spatial axes whose every reader is a
    Conv with explicit padding (``auto_pad`` NOTSET) reading it as its data input, and which is
    no graph output. TPU-MLIR, ESP-DL and the other NPU compilers do the same, so the Pad gets
    no quantization of its own (and no row in a calibration table)."""

    name = "fold-pad-into-conv"

    def __call__(self, model: ModelProto) -> bool:
        graph = model.graph
        inits = initializers(graph)
        readers = consumers(graph)
        outputs = {o.name for o in graph.output}
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.input, *graph.value_info)
                 if v.type.tensor_type.HasField("shape")}
        folded: set[int] = set()
        for k, pad in enumerate(graph.node):
            if pad.op_type != "Pad" or len(pad.output) != 1 or pad.output[0] in outputs:
                continue
            convs = readers.get(pad.output[0], [])
            ok = bool(convs) and all(c.op_type == "Conv" and c.domain in ("", "ai.onnx") and c.input[0] == pad.output[0]
                                     and pad.output[0] not in c.input[1:]
                                     and get_attr(c, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") for c in convs)
            extra = _spatial_pads(pad, inits, ranks.get(pad.input[0])) if ok else None
            if extra is None:
                continue
            spatial = len(extra) // 2
            if any(len(get_attr(c, "pads", [0] * 2 * spatial)) != 2 * spatial for c in convs):
                continue
            for conv in convs:
                pads = [int(a) + int(b) for a, b in zip(get_attr(conv, "pads", [0] * 2 * spatial), extra)]
                keep = [a for a in conv.attribute if a.name != "pads"]
                conv.ClearField("attribute")
                conv.attribute.extend([*keep, helper.make_attribute("pads", pads)])
                conv.input[0] = pad.input[0]
            folded.add(k)
        gone = {graph.node[k].output[0] for k in folded}
        remove_nodes(graph, folded)
        kept = [v for v in graph.value_info if v.name not in gone]
        if len(kept) != len(graph.value_info):
            graph.ClearField("value_info")
            graph.value_info.extend(kept)
        return bool(folded)
