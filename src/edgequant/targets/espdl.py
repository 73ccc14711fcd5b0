"""Espressif ESP-DL: ``real = int · 2^exponent``. Symmetric power-of-two int8/int16; per-channel
int8 weights on ESP32-P4-class chips, per-tensor on ESP32-S3-class; int16 is per tensor.
Rounding and bias width as esp-ppq 1.3.12 (Espressif's quantizer for ESP-DL) sets them per
platform: ESP32-P4 rounds half to even with 32-bit biases, ESP32-S3 rounds half up with 20-bit
biases (``EspdlQuantizer._PLATFORM_CONFIGS``); int16 rounds half up. Per-channel weights on the
P4 are Conv, ConvTranspose and Gemm weights; a MatMul's are per tensor, as esp-ppq quantizes them.
The graph outputs are quantized: the chip hands back int8 (or int16) with an exponent, except
Softmax's, in float. An input read only by an Add, Sub or Concat takes the output's exponent
(esp-ppq aligns them to the output). A constant Add after a Conv is its bias (one op)."""

from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import Scheme
from edgequant.targets.profile import TargetProfile

ESP = Scheme(power_of_two=True, rounding="half_up")
_ALIGN = dict(fusions=("relu", "pad", "bias"), quantize_outputs=True, tied_inputs=("Add", "Sub", "Concat"), float_output_ops=("Softmax", "LogSoftmax"))
P4 = Scheme(power_of_two=True, rounding="half_even")
S3 = Scheme(power_of_two=True, rounding="half_up", bias_bits=20)
PROFILES = [
    TargetProfile("espdl", "Espressif ESP-DL", "ESP32-P4: int8 symmetric, power-of-two scales, per-channel weights",
                  QuantDType.INT8, True, QuantDType.INT8, True, True, P4, ("int16",),
                  per_channel_ops=("Conv", "ConvTranspose", "Gemm"), **_ALIGN),  # type: ignore[arg-type]
    TargetProfile("espdl-s3", "Espressif ESP-DL", "ESP32-S3: int8 symmetric, power-of-two scales, per-tensor weights",
                  QuantDType.INT8, True, QuantDType.INT8, True, False, S3, ("int16",), **_ALIGN),  # type: ignore[arg-type]
    TargetProfile("espdl-int16", "Espressif ESP-DL", "int16 symmetric, power-of-two scales, per tensor",
                  QuantDType.INT16, True, QuantDType.INT16, True, False, ESP, ("int16",), **_ALIGN),  # type: ignore[arg-type]
]
