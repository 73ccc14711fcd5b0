"""edgequant: post-training quantization of ONNX models for edge NPUs."""

from edgequant.analysis.analyze import ErrorReport, analyze
from edgequant.analysis.graphwise import TensorError
from edgequant.analysis.layerwise import LayerError
from edgequant.analysis.metrics import Metrics
from edgequant.analysis.report import write_report
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
from edgequant.planning.overrides import Override
from edgequant.quant.dtypes import QuantDType

__version__ = "0.1.0"

__all__ = [
    "CalibrationDataError",
    "ConfigError",
    "EdgequantError",
    "ErrorReport",
    "InputSettings",
    "LayerError",
    "Method",
    "Metrics",
    "ModelLoadError",
    "NotYetSupportedError",
    "OutputError",
    "Override",
    "OutputFidelity",
    "QuantDType",
    "QuantOptions",
    "QuantizeResult",
    "Summary",
    "TensorError",
    "TensorNameError",
    "__version__",
    "analyze",
    "make_options",
    "quantize",
    "write_report",
]
