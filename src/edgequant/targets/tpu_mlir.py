"""Sophgo TPU-MLIR: symmetric int8 with per-tensor thresholds (calibration table), per-channel
weights; the asymmetric variant matches ``model_deploy.py --asymmetric``."""

from edgequant.quant.dtypes import QuantDType
from edgequant.targets.profile import TargetProfile

PROFILES = [
    TargetProfile("tpu-mlir", "Sophgo TPU-MLIR", "int8 symmetric activations (thresholds), int8 per-channel weights",
                  QuantDType.INT8, True, QuantDType.INT8, True, True, fallback=("int16", "float")),
    TargetProfile("tpu-mlir-asym", "Sophgo TPU-MLIR", "int8 asymmetric activations, int8 per-channel weights",
                  QuantDType.INT8, False, QuantDType.INT8, True, True),
]
