"""Integer types used by QuantizeLinear / DequantizeLinear, described once."""

from __future__ import annotations

import enum

import numpy as np
from onnx import TensorProto


class QuantDType(enum.Enum):
    """A quantized integer type: its range, numpy and ONNX types and minimum opset."""

    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"

    @property
    def np_dtype(self) -> type:
        return {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}[
            self.value
        ]

    @property
    def onnx_type(self) -> int:
        return {
            "int8": TensorProto.INT8,
            "uint8": TensorProto.UINT8,
            "int16": TensorProto.INT16,
            "uint16": TensorProto.UINT16,
        }[self.value]

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.np_dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.np_dtype).max)

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def bits(self) -> int:
        return int(np.iinfo(self.np_dtype).bits)

    @property
    def min_opset(self) -> int:
        """Lowest ai.onnx opset whose QuantizeLinear accepts this type."""
        return 21 if self.bits == 16 else 10

    @classmethod
    def parse(cls, text: str) -> QuantDType:
        from edgequant.errors import ConfigError

        try:
            return cls(text.lower())
        except ValueError:
            valid = ", ".join(d.value for d in cls)
            raise ConfigError(f"unknown quantized dtype {text!r}; valid: {valid}") from None
