"""A target's integer arithmetic for one convolution, written independently of edgequant.

int accumulators of ``(q_x − z_x)·(q_w − z_w)`` plus the int32 bias, rescaled by
``M = s_x·s_w / s_y`` (a shift when every scale is a power of two), rounded the target's way,
offset by ``z_y`` and clipped (at 0, and at the Clip's maximum, when the target runs a Relu /
Relu6 fused into the convolution) — compared with onnxruntime running the QDQ model in float.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tests.conftest import run


def conv_int(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    n, c, h, wd = x.shape
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    acc = np.zeros((n, w.shape[0], oh, ow), np.int64)
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            acc += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return acc


def first_conv_difference(result, feed: dict, stride: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(|integer simulation − onnxruntime| per output element, rescale multipliers M) for the
    first Conv of ``result.model``, which must read a quantized input, weight and bias."""
    q = result.model
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    prod = {o: n for n in q.graph.node for o in n.output}
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    dq_x, dq_w, dq_b = (prod[i] for i in conv.input)
    q_x = prod[dq_x.input[0]]
    readers = [n for n in q.graph.node if conv.output[0] in n.input]
    fused = readers[0] if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") else None
    y_name = fused.output[0] if fused is not None else conv.output[0]
    q_y = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == y_name)
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    probe.graph.output.extend([onnx.ValueInfoProto(name=q_x.output[0]), onnx.ValueInfoProto(name=q_y.output[0])])
    *_, x_int, y_ort = run(probe, feed)

    s_x, z_x = float(inits[dq_x.input[1]]), int(inits[dq_x.input[2]])
    s_w, z_w = inits[dq_w.input[1]].astype(np.float64), inits[dq_w.input[2]].astype(np.int64)
    s_y, z_y = float(inits[q_y.input[1]]), int(inits[q_y.input[2]])
    w_int = inits[dq_w.input[0]].astype(np.int64)
    z_w = z_w.reshape(-1, 1, 1, 1) if z_w.ndim else z_w
    acc = conv_int(x_int.astype(np.int64) - z_x, w_int - z_w, stride, pad)
    acc += inits[dq_b.input[0]].astype(np.int64).reshape(1, -1, 1, 1)
    m = (s_x * np.broadcast_to(s_w, (w_int.shape[0],)) / s_y).reshape(1, -1, 1, 1)
    scaled = acc * m
    y = (np.floor(scaled + 0.5) if result.options.scheme.rounding == "half_up" else np.rint(scaled)) + z_y
    if fused is not None:  # Relu / Clip(0, hi) inside the convolution, on the integer output
        y = np.maximum(y, z_y)
        if fused.op_type == "Clip" and len(fused.input) > 2 and fused.input[2]:
            y = np.minimum(y, np.floor(float(inits[fused.input[2]]) / s_y + 0.5) + z_y)
    info = np.iinfo(y_ort.dtype)
    return np.abs(np.clip(y, info.min, info.max) - y_ort.astype(np.int64)), m
