"""Loading, saving and small graph helpers over ``onnx.ModelProto``."""

from edgequant.ir.model import ensure_opset, load_model, opset_of, save_model

__all__ = ["ensure_opset", "load_model", "opset_of", "save_model"]
