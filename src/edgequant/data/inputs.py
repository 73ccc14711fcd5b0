"""What each model input expects, and checking that a sample fits it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, helper

from edgequant.errors import CalibrationDataError, ConfigError


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (None for symbolic dims) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def batch_fixed(self) -> bool:
        """False only when axis 0 is a symbolic batch dimension that samples can be stacked on."""
        return not self.shape or self.shape[0] is not None

    def with_shape(self, shape: tuple[int, ...] | None) -> InputSpec:
        if shape is None:
            return self
        if len(shape) != len(self.shape):
            raise ConfigError(
                f"input_shape {list(shape)} for input {self.name!r} has rank {len(shape)}, "
                f"the model's input has rank {len(self.shape)} ({self._pretty()})"
            )
        for got, want in zip(shape, self.shape):
            if want is not None and got != want:
                raise ConfigError(
                    f"input_shape {list(shape)} for input {self.name!r} does not match the "
                    f"model's {self._pretty()}"
                )
        return InputSpec(self.name, tuple(int(d) for d in shape), self.dtype)

    def _pretty(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class InputSettings:
    """How to read and preprocess files for one input (XQuant ``input_parametres`` fields)."""

    file_type: str | None = None
    color_format: str = "rgb"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    preprocess: str | None = None
    shape: tuple[int, ...] | None = None
    data_path: str | None = None

    def as_dict(self, spec: InputSpec) -> dict:
        """The ``input_parametr`` dict a user preprocess function receives."""
        return {
            "input_name": spec.name,
            "input_shape": [1 if d is None else d for d in spec.shape],
            "dtype": str(spec.dtype),
            "file_type": self.file_type,
            "color_format": self.color_format,
            "mean_value": list(self.mean) if self.mean else None,
            "std_value": list(self.std) if self.std else None,
            "layout": self.layout,
        }


def model_inputs(model: ModelProto) -> list[InputSpec]:
    """The real inputs of a model (initializers listed as inputs are skipped)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, dtype))
    return specs


def conform(arr, spec: InputSpec, origin: str) -> np.ndarray:
    """Check a sample against its input and return it as a batch array of the input's dtype.

    A sample one rank short of the input gets a batch dimension. Float data for an integer
    input must hold integers; NaN or Inf is refused.
    """
    if hasattr(arr, "detach"):  # torch tensors from user preprocess functions
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise CalibrationDataError(f"{origin}: data for input {spec.name!r} is not numeric (dtype {arr.dtype})")
    if spec.shape and arr.ndim == len(spec.shape) - 1:
        arr = arr[None]
    if spec.shape and arr.ndim != len(spec.shape):
        raise CalibrationDataError(
            f"{origin}: input {spec.name!r} expects shape {spec._pretty()}, got {list(arr.shape)}"
        )
    for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
        if want is not None and got != want and not (axis == 0 and got >= 1):
            raise CalibrationDataError(
                f"{origin}: input {spec.name!r} expects shape {spec._pretty()}, got {list(arr.shape)}"
            )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise CalibrationDataError(
            f"{origin}: input {spec.name!r} contains NaN or Inf; clean the calibration data"
        )
    if spec.dtype.kind in "iub" and arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise CalibrationDataError(
                f"{origin}: input {spec.name!r} has dtype {spec.dtype} but the data holds "
                f"non-integer floats; save integer arrays"
            )
    if spec.dtype.kind == "f" and arr.dtype.kind == "b":
        raise CalibrationDataError(f"{origin}: input {spec.name!r} expects {spec.dtype}, got bool data")
    if spec.dtype.kind in "iu" and arr.dtype.kind in "iuf" and arr.size:
        info = np.iinfo(spec.dtype)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:  # astype would wrap them around silently
            raise CalibrationDataError(f"{origin}: input {spec.name!r} is {spec.dtype}, but the data holds values "
                                       f"from {lo} to {hi}, outside [{info.min}, {info.max}]")
    return np.require(arr.astype(spec.dtype, copy=False), requirements="C")
