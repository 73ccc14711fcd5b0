"""Quantization data types, specs and the pure maths that turns ranges into parameters."""

from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import QuantParams, compute_params, quantize_array

__all__ = ["QuantDType", "QuantParams", "compute_params", "quantize_array"]
