"""Create onnxruntime sessions, optionally exposing intermediate tensors as outputs."""

from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort
from onnx import ModelProto

from edgequant.errors import ModelLoadError
from edgequant.ir.graph import NameScope
from edgequant.ir.model import byte_size, save_with_external_data
from edgequant.runtime.segments import SEGMENT_NODES, split_model

_LIMIT = 1_900_000_000


def providers_for(device: str) -> list[str]:
    """``auto`` picks CUDA when onnxruntime has it, else CPU."""
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(model: ModelProto, extra_outputs: list[str] | tuple[str, ...] = (),
                 device: str = "cpu", threads: int = 0,
                 extra_nodes: list[onnx.NodeProto] | tuple[onnx.NodeProto, ...] = (),
                 arena: bool = True) -> ort.InferenceSession:
    """A session over ``model`` whose outputs are the graph outputs plus ``extra_outputs``;
    ``extra_nodes`` (computing some of them) are added for the session only. ``model`` is
    serialised with the additions and given back unchanged (no copy of its weights).
    ``arena=False`` turns off onnxruntime's CPU memory arena: with many exposed tensors of
    shapes that change from sample to sample it only grows (PP-OCRv4's recognizer, 64 → 512
    lines: peak RSS ×1.32 with it, ×1.19 without, at the same speed)."""
    present = {o.name for o in model.graph.output}
    added = [onnx.ValueInfoProto(name=n) for n in extra_outputs if n not in present]
    model.graph.output.extend(added)
    original = list(model.graph.node) if extra_nodes else None
    if original is not None:  # each extra node right after what it reads: tensors die early
        model.graph.ClearField("node")
        model.graph.node.extend(_interleaved(model, original, list(extra_nodes)))
    try:
        in_order = original is not None  # run the nodes in the order given (reductions early)
        if len(model.graph.node) > SEGMENT_NODES:
            outputs = [o.name for o in model.graph.output]
            chained = split_model(model, list(model.graph.node), outputs,
                                  lambda part: _create(part, device, threads, arena, in_order))
            if chained is not None:
                return chained
        return _create(model, device, threads, arena, in_order)
    finally:
        if original is not None:
            model.graph.ClearField("node")
            model.graph.node.extend(original)
        if added:
            del model.graph.output[len(model.graph.output) - len(added):]


def _interleaved(model: ModelProto, nodes: list[onnx.NodeProto], extra: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` with each of ``extra`` (reading one tensor) placed right after that tensor's
    producer (or first, for a graph input), so no tensor is kept alive, or crosses a
    segment, only for them (run in this order: PP-OCRv4's recognizer, minmax over 64 lines,
    peak RSS 258 MB where onnxruntime's default order held 805 MB)."""
    after: dict[str, list[onnx.NodeProto]] = {}
    for node in extra:
        after.setdefault(node.input[0], []).append(node)
    order = [n for i in model.graph.input for n in after.pop(i.name, [])]
    for node in nodes:
        order.append(node)
        for o in node.output:
            order += after.pop(o, [])
    return order + [n for rest in after.values() for n in rest]


def extremes(model: ModelProto, tensors: list[str]) -> tuple[list[onnx.NodeProto], dict[str, tuple[str, str]]]:
    """ReduceMin and ReduceMax nodes over each of ``tensors`` (all axes, a scalar each), and
    tensor → (min output, max output). onnxruntime computes them while each tensor is still in
    cache, so a tensor whose range alone is needed is never copied out."""
    scope = NameScope(model.graph)
    nodes, names = [], {}
    for t in tensors:
        lo, hi = scope.fresh(f"{t}_min"), scope.fresh(f"{t}_max")
        nodes.append(onnx.helper.make_node("ReduceMin", [t], [lo], name=scope.fresh(f"{t}_ReduceMin"), keepdims=0))
        nodes.append(onnx.helper.make_node("ReduceMax", [t], [hi], name=scope.fresh(f"{t}_ReduceMax"), keepdims=0))
        names[t] = (lo, hi)
    return nodes, names


def _create(model: ModelProto, device: str, threads: int, arena: bool = True,
            in_order: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_cpu_mem_arena = arena
    if in_order:  # onnxruntime's default order ran the reductions last: every tensor alive at once
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        opts.intra_op_num_threads = threads
    try:
        if byte_size(model) < _LIMIT:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers_for(device))
        with tempfile.TemporaryDirectory() as tmp:  # onnxruntime reads the weights once, from the file
            path = os.path.join(tmp, "model.onnx")
            save_with_external_data(model, path, "model.data")
            return ort.InferenceSession(path, opts, providers=providers_for(device))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"onnxruntime cannot load the model: {first}") from None
