"""VeriSilicon / Amlogic Acuity (pegasus ``--quantizer``): asymmetric_affine uint8,
perchannel_symmetric_affine int8, and dynamic_fixed_point int8/int16 (power-of-two scales)."""

from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import Scheme
from edgequant.targets.profile import TargetProfile

DFP = Scheme(power_of_two=True)
PROFILES = [
    TargetProfile("acuity", "VeriSilicon Acuity", "asymmetric_affine uint8: activations and weights per tensor",
                  QuantDType.UINT8, False, QuantDType.UINT8, False, False),
    TargetProfile("acuity-perchannel", "VeriSilicon Acuity",
                  "perchannel_symmetric_affine int8: symmetric int8, per-channel convolution weights",
                  QuantDType.INT8, True, QuantDType.INT8, True, True, per_channel_ops=("Conv", "ConvTranspose")),
    TargetProfile("acuity-dfp8", "VeriSilicon Acuity", "dynamic_fixed_point-i8: symmetric int8, power-of-two scales",
                  QuantDType.INT8, True, QuantDType.INT8, True, False, DFP),
    TargetProfile("acuity-dfp16", "VeriSilicon Acuity", "dynamic_fixed_point-i16: symmetric int16, power-of-two scales",
                  QuantDType.INT16, True, QuantDType.INT16, True, False, DFP),
]
