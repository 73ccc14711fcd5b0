"""onnxruntime sessions for float and quantized models."""

from edgequant.runtime.session import make_session, providers_for

__all__ = ["make_session", "providers_for"]
