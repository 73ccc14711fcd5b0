"""onnxruntime / TensorRT on a host: the U8S8 layout onnxruntime runs with integer kernels."""

from edgequant.quant.dtypes import QuantDType
from edgequant.targets.profile import TargetProfile

PROFILES = [
    TargetProfile("generic", "ONNX Runtime / TensorRT",
                  "uint8 asymmetric activations, int8 symmetric per-channel weights (QLinearConv, QGemm)",
                  QuantDType.UINT8, False, QuantDType.INT8, True, True, constants=True),
    TargetProfile("generic-s8s8", "ONNX Runtime / TensorRT",
                  "int8 symmetric activations and weights (TensorRT explicit quantization)",
                  QuantDType.INT8, True, QuantDType.INT8, True, True, constants=True),
]
