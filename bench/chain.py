"""The graph-size scaling job.

A synthetic chain ``x (1×8×16×16) → Conv 3×3 (8 channels, pad 1) → Relu → Conv → Relu …`` of
N nodes is quantized end to end by ``edgequant.quantize`` (defaults, 8 random samples; one of
them is held out for the fidelity check); then the parts: the same call with no held-out
samples, the Q/DQ insertion pass (``edgequant.transform.qdq.insert_qdq``) alone on the same
plan, and onnxruntime's session creation for the quantized model. If time grows linearly,
t(8000) / t(2000) is 4.

One size per process: ``python -m bench.chain NODES MODEL_OUT RESULT_JSON`` (this module imports
only edgequant and onnx, so the job measures the edgequant it is given; see bench.scaling).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import edgequant
from bench.job import _peak_rss_mb

SHAPE = (1, 8, 16, 16)
SAMPLES = 8


def conv_relu_chain(nodes: int, seed: int = 0) -> onnx.ModelProto:
    """A chain of ``nodes // 2`` Conv/Relu pairs. Each Conv is the identity (centre tap) plus
    N(0, 0.02²) noise, scaled to unit expected gain, so that thousands of layers neither blow
    up nor die out (a He-initialised chain overflows float32 by 1,000 layers)."""
    rng = np.random.default_rng(seed)
    c = SHAPE[1]
    eye = np.zeros((c, c, 3, 3), np.float32)
    eye[range(c), range(c), 1, 1] = 1.0
    graph_nodes, inits, prev = [], [], "x"
    for i in range(nodes // 2):
        w = (eye + rng.normal(0, 0.02, eye.shape)) / np.sqrt(1 + eye.size / c * 0.02**2)
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.full(c, 0.01, np.float32), f"b{i}")]
        graph_nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4),
                        helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        prev = f"r{i}"
    graph = helper.make_graph(graph_nodes, f"chain{nodes}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, SHAPE)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def samples(seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(SAMPLES)]


def _insert_seconds(result) -> tuple[float | None, str]:
    """Time ``insert_qdq`` alone on the result's prepared model, plan and parameters."""
    try:
        from edgequant.transform.qdq import insert_qdq

        t = time.perf_counter()
        insert_qdq(result.float_model, result.plan, result.params)
        return time.perf_counter() - t, ""
    except Exception as exc:  # the API may have moved in a rebuild: report, do not fail
        return None, f"{type(exc).__name__}: {exc}"[:200]


def _timed(fn) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def job(nodes: int, path: Path, result_path: Path) -> None:
    """Quantize one chain and write its timings (run in a fresh process). ``seconds`` is the
    default end-to-end call; the breakdown: the same call without held-out evaluation (no
    second model to run), ``insert_qdq`` alone, and onnxruntime creating a session for the
    quantized model (which the evaluation does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(conv_relu_chain(nodes), str(path))
    result, seconds = _timed(lambda: edgequant.quantize(str(path), samples()))
    peak = _peak_rss_mb()
    _, no_eval = _timed(lambda: edgequant.quantize(str(path), samples(), eval_samples=0))
    insert, error = _insert_seconds(result)
    data = result.model.SerializeToString()
    _, session = _timed(lambda: ort.InferenceSession(data, providers=["CPUExecutionProvider"]))
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in result.model.graph.node)
    result_path.write_text(json.dumps({
        "nodes": nodes, "status": "ok", "seconds": seconds, "peak_rss_mb": peak, "no_eval_seconds": no_eval,
        "insert_qdq_seconds": insert, "insert_qdq_error": error, "ort_session_seconds": session, "qdq_nodes": qdq}))


if __name__ == "__main__":
    job(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
