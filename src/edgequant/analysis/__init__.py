"""Fidelity metrics between float and quantized outputs."""

from edgequant.analysis.metrics import cosine, sqnr_db

__all__ = ["cosine", "sqnr_db"]
