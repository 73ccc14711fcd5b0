"""Shape inference pass."""

from __future__ import annotations

import logging

import onnx
from onnx import ModelProto

from edgequant.ir.model import skeleton

log = logging.getLogger(__name__)


class InferShapes:
    """Recompute ``value_info`` from the graph inputs (data propagation on).

    Existing ``value_info`` is discarded first: exporters often leave the static shapes of the
    example they traced, which would turn a dynamic dimension into a constant. Before:
    tensors between nodes have no (or stale) types. After: every inferable tensor has one,
    derived from the declared inputs. Unknown custom ops are skipped, never an error.
    """

    name = "infer-shapes"

    def __call__(self, model: ModelProto) -> bool:
        before = [v.SerializeToString() for v in model.graph.value_info]
        stripped = skeleton(model)  # weights are not needed to infer shapes
        stripped.graph.ClearField("value_info")
        try:
            inferred = onnx.shape_inference.infer_shapes(stripped, strict_mode=False, data_prop=True)
        except Exception as exc:  # shape inference is best effort on exotic graphs
            log.warning("shape inference failed (%s); continuing without it", exc)
            return False
        model.graph.ClearField("value_info")
        model.graph.value_info.extend(inferred.graph.value_info)
        return [v.SerializeToString() for v in model.graph.value_info] != before


def inferred_shapes(model: ModelProto, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The static shape of every tensor shape inference can tell with the graph inputs at
    ``inputs`` (no run; best effort: what it cannot tell is left out)."""
    from edgequant.ir.graph import static_shapes

    stripped = skeleton(model)
    stripped.graph.ClearField("value_info")
    for i in stripped.graph.input:
        if i.name in inputs and i.type.HasField("tensor_type"):
            i.type.tensor_type.shape.ClearField("dim")
            for d in inputs[i.name]:
                i.type.tensor_type.shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(stripped, strict_mode=False, data_prop=True)
    except Exception:  # best effort
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for k, v in static_shapes(inferred.graph).items():
        dims = tuple(d for d in v if isinstance(d, int) and d > 0)
        if len(dims) == len(v):
            out[k] = dims
    return out
