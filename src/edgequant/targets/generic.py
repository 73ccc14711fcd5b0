"""onnxruntime / TensorRT on a host: the U8S8 layout onnxruntime runs with integer kernels.

The default repair moves layers to float here, not to 16 bits: onnxruntime's CPU kernels
have no 16-bit integer Conv/MatMul, so a 16-bit layer runs as a float kernel behind
DequantizeLinear/QuantizeLinear (its weights dequantized on every run). On all-MiniLM-L6-v2
the repaired model ran 16.5 ms with int16 layers and 1.4 ms with float ones (float model
3.9 ms), at the same accuracy.
"""

from edgequant.quant.dtypes import QuantDType
from edgequant.targets.profile import TargetProfile

PROFILES = [
    TargetProfile("generic", "ONNX Runtime / TensorRT",
                  "uint8 asymmetric activations, int8 symmetric per-channel weights (QLinearConv, QGemm)",
                  QuantDType.UINT8, False, QuantDType.INT8, True, True, constants=True, repair_fallback="float",
                  control_flow=True, fusions=(), float_narrow_convs=8),
    TargetProfile("generic-s8s8", "ONNX Runtime / TensorRT",
                  "int8 symmetric activations and weights (TensorRT explicit quantization)",
                  QuantDType.INT8, True, QuantDType.INT8, True, True, constants=True, repair_fallback="float",
                  control_flow=True, fusions=()),
]
