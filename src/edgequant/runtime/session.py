"""Create onnxruntime sessions, optionally exposing intermediate tensors as outputs."""

from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort
from onnx import ModelProto

from edgequant.errors import ModelLoadError

_LIMIT = 1_900_000_000


def providers_for(device: str) -> list[str]:
    """``auto`` picks CUDA when onnxruntime has it, else CPU."""
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(model: ModelProto, extra_outputs: list[str] | tuple[str, ...] = (),
                 device: str = "cpu", threads: int = 0) -> ort.InferenceSession:
    """A session over ``model`` whose outputs are the graph outputs plus ``extra_outputs``."""
    present = {o.name for o in model.graph.output}
    added = [onnx.ValueInfoProto(name=n) for n in extra_outputs if n not in present]
    model.graph.output.extend(added)  # serialised with the extra outputs, then restored below
    try:
        return _create(model, device, threads)
    finally:
        if added:
            del model.graph.output[len(model.graph.output) - len(added):]


def _create(model: ModelProto, device: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    try:
        if model.ByteSize() < _LIMIT:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers_for(device))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.data")
            return ort.InferenceSession(path, opts, providers=providers_for(device))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"onnxruntime cannot load the model: {first}") from None
