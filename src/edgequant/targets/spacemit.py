"""SpacemiT XQuant defaults: QDQ for onnxruntime with SpacemiT's execution provider — int8
symmetric per-channel weights, uint8 asymmetric activations."""

from edgequant.quant.dtypes import QuantDType
from edgequant.targets.profile import TargetProfile

PROFILES = [
    TargetProfile("spacemit", "SpacemiT XQuant", "uint8 asymmetric activations, int8 symmetric per-channel weights",
                  QuantDType.UINT8, False, QuantDType.INT8, True, True),
]
