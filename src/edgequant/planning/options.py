"""Quantization options: one frozen value with one default per field, parsed once at the edge.

``parse_options`` is the only place keywords (Python callers, CLI flags, config keys) become a
``QuantOptions``: strings turn into enums and dtypes there, a target profile is applied first
(explicit options win over it), and an unknown name is an error naming the closest field.
Everything past the edge reads typed fields only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgequant.calibration.method import Method
from edgequant.errors import ConfigError, closest_names
from edgequant.planning.overrides import Override, parse_precision
from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import DEFAULT_SCHEME, Scheme
from edgequant.targets import apply_target

__all__ = ["Method", "QuantOptions", "parse_options"]


@dataclass(frozen=True)
class QuantOptions:
    """Everything that shapes the quantized model, and how the work runs.

    ``activation_dtype`` uint8 asymmetric + ``weight_dtype`` int8 symmetric per-channel is the
    layout onnxruntime runs with integer kernels (U8S8). ``device``, ``workers`` and
    ``ray_address`` say where the work runs (onnxruntime's CUDA provider, local worker
    processes, a Ray cluster); they never change the output bytes.
    """

    method: Method = Method.PERCENTILE
    percentile: float = 99.99
    activation_dtype: QuantDType = QuantDType.UINT8
    weight_dtype: QuantDType = QuantDType.INT8
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    per_channel: bool = True
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
    workers: int = 1
    ray_address: str | None = None

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
        if self.workers < 1:
            raise ConfigError(f"workers must be ≥ 1, got {self.workers}")
        if self.ray_address is not None and self.workers != 1:
            raise ConfigError("give --workers or --ray, not both (a Ray cluster has its own workers)")

    @property
    def required_opset(self) -> int:
        dtypes = [self.activation_dtype, self.weight_dtype]
        for o in self.overrides:
            dtypes += [d for d in (o.precision, o.weight) if isinstance(d, QuantDType)]
            if o.level in (1, 2, 3):
                dtypes.append(QuantDType.INT16)
        need = max(d.min_opset for d in dtypes)
        return max(need, 13 if self.per_channel else 10)

    def with_overrides(self, extra: Iterable[Override]) -> QuantOptions:
        """These options with ``extra`` overrides after the ones they hold (a later one wins)."""
        return dataclasses.replace(self, overrides=self.overrides + tuple(extra))


FIELDS = {f.name: f for f in dataclasses.fields(QuantOptions)}
_NULLABLE = {"num_samples", "ray_address", "per_channel_ops"}


def parse_options(base: QuantOptions | None, changes: Mapping[str, object]) -> QuantOptions:
    """``base`` (default options) with ``changes`` applied, strings parsed.

    ``changes`` maps field names to values; a value is taken as given (``None`` is a value, and
    only fields that may be ``None`` accept it). ``target`` applies the profile first, so the
    other changes win over it. ``method="entropy"``, ``activation_dtype="int16"``,
    ``overrides=["Conv_3=int16"]`` or ``{"Conv_3": "int16"}`` are parsed here.
    """
    unknown = [k for k in changes if k not in FIELDS]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; did you mean {closest_names(unknown[0], list(FIELDS))}?")
    options = base or QuantOptions()
    if "target" in changes:  # the profile first; the explicit changes below win
        options = apply_target(options, _text("target", changes["target"]))
    parsed: dict[str, Any] = {k: _parse(k, v) for k, v in changes.items() if k != "target"}
    return dataclasses.replace(options, **parsed)


def _text(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"option {key} must be a name, got {value!r}")
    return value


def _parse(key: str, value: object) -> object:
    if value is None:
        if key not in _NULLABLE:
            raise ConfigError(f"option {key} cannot be None; leave it out for the default")
        return None
    if key == "method":
        return value if isinstance(value, Method) else Method.parse(_text(key, value))
    if key in ("activation_dtype", "weight_dtype"):
        return value if isinstance(value, QuantDType) else QuantDType.parse(_text(key, value))
    if key == "overrides":
        return parse_overrides(value)
    kind = _SIMPLE.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ConfigError(f"option {key} must be {kind.__name__}, got {value!r}")
    return value


_SIMPLE: dict[str, type] = {
    "percentile": float, "collapse_cosine": float, "activation_symmetric": bool, "weight_symmetric": bool,
    "per_channel": bool, "quantize_outputs": bool, "simplify": bool, "batch_size": int, "num_samples": int,
    "eval_samples": int, "workers": int, "device": str, "ray_address": str,
}


def parse_overrides(value: object) -> tuple[Override, ...]:
    """``["Conv_3=int16", "op:Softmax=float"]``, ``{"Conv_3": "int16"}`` or Override values."""
    if isinstance(value, Mapping):
        return tuple(Override(str(k), parse_precision(str(v))) for k, v in value.items())
    if isinstance(value, str | Override):
        value = [value]
    if not isinstance(value, Iterable):
        raise ConfigError(f"overrides must be a list of SELECTOR=PRECISION texts or Override values, got {value!r}")
    return tuple(v if isinstance(v, Override) else Override.parse(str(v)) for v in value)
