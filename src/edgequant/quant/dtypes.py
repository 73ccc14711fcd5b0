"""Integer types used by QuantizeLinear / DequantizeLinear, described once."""

from __future__ import annotations

import enum

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgequant.errors import ConfigError


class QuantDType(enum.Enum):
    """A quantized integer type: its range, numpy and ONNX types and minimum opset."""

    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"
    INT4 = "int4"  # weights only (W4A8, W4A16), stored one value per int8 in numpy
    UINT4 = "uint4"

    @property
    def np_dtype(self) -> type:
        return {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
                "int4": np.int8, "uint4": np.uint8}[self.value]

    @property
    def onnx_type(self) -> int:
        return {
            "int8": TensorProto.INT8,
            "uint8": TensorProto.UINT8,
            "int16": TensorProto.INT16,
            "uint16": TensorProto.UINT16,
            "int4": TensorProto.INT4,
            "uint4": TensorProto.UINT4,
        }[self.value]

    @property
    def qmin(self) -> int:
        return _RANGES[self.value][0]

    @property
    def qmax(self) -> int:
        return _RANGES[self.value][1]

    @property
    def signed(self) -> bool:
        return _RANGES[self.value][0] < 0

    @property
    def bits(self) -> int:
        return _RANGES[self.value][2]

    @property
    def min_opset(self) -> int:
        """Lowest ai.onnx opset whose QuantizeLinear accepts this type."""
        return 21 if self.bits in (4, 16) else 10

    @property
    def unsigned(self) -> QuantDType:
        """The unsigned type of the same width (itself when unsigned)."""
        return QuantDType("u" + self.value.removeprefix("u"))

    def tensor(self, name: str, values: np.ndarray) -> TensorProto:
        """An initializer of this type (4-bit values are packed two per byte by onnx)."""
        if self.bits == 4:
            arr = np.asarray(values)
            return helper.make_tensor(name, self.onnx_type, list(arr.shape), arr.astype(np.int32).ravel().tolist())
        return numpy_helper.from_array(np.asarray(values, self.np_dtype), name)

    @classmethod
    def parse(cls, text: str) -> QuantDType:
        try:
            return cls(text.lower())
        except ValueError:
            valid = ", ".join(d.value for d in cls)
            raise ConfigError(f"unknown quantized dtype {text!r}; valid: {valid}") from None


#: (qmin, qmax, bits) of each type, read often in the per-weight maths.
_RANGES: dict[str, tuple[int, int, int]] = {
    "int8": (-128, 127, 8), "uint8": (0, 255, 8), "int16": (-32768, 32767, 16), "uint16": (0, 65535, 16),
    "int4": (-8, 7, 4), "uint4": (0, 15, 4),
}
