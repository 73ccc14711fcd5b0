"""Quantization options: one frozen value with one default per field."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edgequant.errors import ConfigError
from edgequant.planning.overrides import Override
from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import DEFAULT_SCHEME, Scheme


class Method(enum.Enum):
    """How an activation's clipping range is chosen from calibration data."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"

    @classmethod
    def parse(cls, text: str) -> Method:
        aliases = {"kl": "entropy", "default": "percentile", "max": "minmax"}
        key = aliases.get(text.lower(), text.lower())
        try:
            return cls(key)
        except ValueError:
            valid = ", ".join([m.value for m in cls] + list(aliases))
            raise ConfigError(
                f"calibration type {text!r} is not implemented; valid: {valid}"
            ) from None


@dataclass(frozen=True)
class QuantOptions:
    """Everything that shapes the quantized model. Defaults suit onnxruntime on CPU.

    ``activation_dtype`` uint8 asymmetric + ``weight_dtype`` int8 symmetric per-channel is the
    layout onnxruntime runs with integer kernels (U8S8).
    """

    method: Method = Method.PERCENTILE
    percentile: float = 99.99
    activation_dtype: QuantDType = QuantDType.UINT8
    weight_dtype: QuantDType = QuantDType.INT8
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    per_channel: bool = True
    share_concat: bool = False
    quantize_outputs: bool = False
    batch_size: int = 1
    num_samples: int | None = 100
    eval_samples: int = 16
    simplify: bool = True
    device: str = "auto"
    overrides: tuple[Override, ...] = ()
    collapse_cosine: float = 0.9
    scheme: Scheme = DEFAULT_SCHEME
    target: str = "generic"
    per_channel_ops: tuple[str, ...] | None = None  # with per_channel: only these op types (None: all)

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(
                f"percentile must be in (50, 100] (e.g. 99.99), got {self.percentile}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be ≥ 1, got {self.batch_size}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"number of samples must be ≥ 1, got {self.num_samples}")
        if self.eval_samples < 0:
            raise ConfigError(f"eval samples must be ≥ 0, got {self.eval_samples}")
        if self.activation_dtype.bits == 4:
            raise ConfigError("4-bit types are for weights (W4A8, W4A16); use int8/uint8/int16/uint16 activations")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"calibration device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def required_opset(self) -> int:
        dtypes = [self.activation_dtype, self.weight_dtype]
        for o in self.overrides:
            dtypes += [d for d in (o.precision, o.weight) if isinstance(d, QuantDType)]
            if o.level in (1, 2, 3):
                dtypes.append(QuantDType.INT16)
        need = max(d.min_opset for d in dtypes)
        return max(need, 13 if self.per_channel else 10)
