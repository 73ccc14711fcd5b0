"""MediaTek NeuroPilot (mtk_converter): unsigned asymmetric activations, per-output-channel weights.

Converter options mirrored: ``use_unsigned_quantization_type`` (uint8 activations),
``use_per_output_channel_quantization``, ``use_weights_symmetric_quantization``;
``allow_8w16a_affine_operators`` is the 8w16a variant (16-bit activations, 8-bit weights); the
converter has no 16-bit weights, so a 16-bit fallback layer keeps int8 weights.
"""

from edgequant.quant.dtypes import QuantDType
from edgequant.targets.profile import TargetProfile

PROFILES = [
    TargetProfile("neuropilot", "MediaTek NeuroPilot", "uint8 asymmetric activations, int8 symmetric per-channel weights",
                  QuantDType.UINT8, False, QuantDType.INT8, True, True, fallback_weight=QuantDType.INT8),
    TargetProfile("neuropilot-8w16a", "MediaTek NeuroPilot",
                  "16-bit symmetric activations with 8-bit weights (allow_8w16a_affine_operators)",
                  QuantDType.INT16, True, QuantDType.INT8, True, True, fallback_weight=QuantDType.INT8),
]
