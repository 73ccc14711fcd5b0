"""Shape inference pass."""

from __future__ import annotations

import logging

import onnx
from onnx import ModelProto

log = logging.getLogger(__name__)


class InferShapes:
    """Fill ``value_info`` with inferred types and shapes (data propagation on).

    Before: tensors between nodes have no type. After: every inferable tensor has one.
    Unknown custom ops are skipped, never an error.
    """

    name = "infer-shapes"

    def __call__(self, model: ModelProto) -> bool:
        before = len(model.graph.value_info)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception as exc:  # shape inference is best effort on exotic graphs
            log.warning("shape inference failed (%s); continuing without it", exc)
            return False
        model.graph.ClearField("value_info")
        model.graph.value_info.extend(inferred.graph.value_info)
        return len(model.graph.value_info) != before
