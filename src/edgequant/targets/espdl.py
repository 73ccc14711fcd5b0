"""Espressif ESP-DL: ``real = int · 2^exponent``. Symmetric power-of-two int8/int16; per-channel
int8 weights on ESP32-P4-class chips, per-tensor on ESP32-S3-class; int16 is per tensor.
Rounding half up, as ESP-DL's kernels (and esp-ppq's ESP-DL quantizer) do."""

from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import Scheme
from edgequant.targets.profile import TargetProfile

ESP = Scheme(power_of_two=True, rounding="half_up")
PROFILES = [
    TargetProfile("espdl", "Espressif ESP-DL", "ESP32-P4: int8 symmetric, power-of-two scales, per-channel weights",
                  QuantDType.INT8, True, QuantDType.INT8, True, True, ESP, ("int16",)),
    TargetProfile("espdl-s3", "Espressif ESP-DL", "ESP32-S3: int8 symmetric, power-of-two scales, per-tensor weights",
                  QuantDType.INT8, True, QuantDType.INT8, True, False, ESP, ("int16",)),
    TargetProfile("espdl-int16", "Espressif ESP-DL", "int16 symmetric, power-of-two scales, per tensor",
                  QuantDType.INT16, True, QuantDType.INT16, True, False, ESP, ("int16",)),
]
