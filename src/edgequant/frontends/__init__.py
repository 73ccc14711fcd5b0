"""Front ends: models from other frameworks to ONNX (PyTorch: ``frontends.torch``, torch optional)."""
