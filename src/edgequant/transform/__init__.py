"""The only graph edit: QuantizeLinear/DequantizeLinear insertion from a finished plan."""

from edgequant.transform.qdq import insert_qdq

__all__ = ["insert_qdq"]
