"""edgequant: post-training quantization of ONNX models for edge NPUs."""

from edgequant.api import OutputFidelity, QuantizeResult, Summary, make_options, quantize
from edgequant.data.inputs import InputSettings
from edgequant.errors import (
    CalibrationDataError,
    ConfigError,
    EdgequantError,
    ModelLoadError,
    NotYetSupportedError,
    OutputError,
    TensorNameError,
)
from edgequant.planning.options import Method, QuantOptions
from edgequant.quant.dtypes import QuantDType

__version__ = "0.1.0"

__all__ = [
    "CalibrationDataError",
    "ConfigError",
    "EdgequantError",
    "InputSettings",
    "Method",
    "ModelLoadError",
    "NotYetSupportedError",
    "OutputError",
    "OutputFidelity",
    "QuantDType",
    "QuantOptions",
    "QuantizeResult",
    "Summary",
    "TensorNameError",
    "__version__",
    "make_options",
    "quantize",
]
