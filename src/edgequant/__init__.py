"""edgequant: post-training quantization of ONNX models for edge NPUs."""

from edgequant._version import __version__
from edgequant.analysis.analyze import ErrorReport, analyze
from edgequant.analysis.graphwise import TensorError
from edgequant.analysis.layerwise import LayerError
from edgequant.analysis.metrics import Metrics
from edgequant.analysis.report import write_report
from edgequant.api import OutputFidelity, QuantizeResult, Summary, make_options, quantize
from edgequant.calibration.method import Method
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
from edgequant.frontends.torch import from_torch
from edgequant.mixed.search import auto_mixed
from edgequant.planning.options import QuantOptions
from edgequant.planning.overrides import Override
from edgequant.quant.dtypes import QuantDType

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
    "auto_mixed",
    "from_torch",
    "make_options",
    "quantize",
    "write_report",
]
