"""Calibration data: model input specs, file readers and streaming sources."""

from edgequant.data.inputs import InputSettings, InputSpec, model_inputs
from edgequant.data.open import open_calibration
from edgequant.data.sources import CalibrationSource

__all__ = ["CalibrationSource", "InputSettings", "InputSpec", "model_inputs", "open_calibration"]
