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

import numpy as np

from edgequant.calibration.method import Method
from edgequant.errors import ConfigError, NotYetSupportedError, closest_names
from edgequant.planning.overrides import Override, parse_precision
from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import DEFAULT_SCHEME, Scheme
from edgequant.targets import apply_target

__all__ = ["Method", "QuantOptions", "Recovery", "parse_options"]


@dataclass(frozen=True)
class Recovery:
    """Accuracy recovery that keeps layers in their bits (``edgequant.algorithms``); all off by
    default, so the output bytes do not change unless one is asked for.

    * ``cle``: cross-layer equalization of consecutive Conv/Gemm pairs (before calibration);
      ``cle_relu6``: through a ReLU6/Clip(0, M) between them, ``bound`` (the Clip becomes Relu
      and a per-channel Min, exact), ``relu`` (it becomes Relu, as in Nagel et al. and AIMET;
      the float model changes where values exceeded M) or ``skip`` (such pairs stay as they are);
    * ``smoothquant``: SmoothQuant's α (0–1) for MatMul/Gemm inputs (before calibration), or
      ``auto``: α chosen per activation by the quantization error of its layers' products;
    * ``bias_correction``: ``empirical`` (measured layer by layer in graph order) or ``fast``
      (the weight rounding's shift on float input means); ``bias_correction_data_count``;
    * ``adaround`` (PyTorch) and ``gptq`` (Hessian-based, numpy) choose each weight's rounding
      layer by layer; their options carry NeuroPilot's names; ``gptq_float_target``: GPTQ
      aims at the float layer output (float inputs) instead of the float weight on the
      quantized model's inputs, so it also absorbs the error of the layers before it;
    * ``finetune_level`` (XQuant): 0 none, 1 GPTQ rounding and empirical bias correction, 2
      GPTQ, then block reconstruction starting from its rounding (blocks of up to
      ``block_max_layers`` layers rounded together, each keeping GPTQ's unless it beats it;
      PyTorch; ``adaround_*`` steps, rate and data count, ``block_batch_size`` samples a step)
      and empirical bias correction; ``block_learn_activations``: the step sizes of the
      activations inside each block are learned with its rounding (LSQ), at
      ``block_activation_lr`` on their logarithm; ``block_time_budget``: seconds for all the
      blocks, shared out block by block, that cut the steps of a block that would run over
      (the output then depends on the machine's speed; none by default).
    """

    cle: bool = False
    cle_relu6: str = "bound"
    smoothquant: float | str | None = None
    bias_correction: str | None = None
    bias_correction_data_count: int = 64
    adaround: bool = False
    adaround_data_count: int = 64
    adaround_optim_steps: int = 1000
    adaround_optim_lr: float = 1e-2
    adaround_batch_size: int = 256
    gptq: bool = False
    hessian_opt_block_size: int = 128
    hessian_opt_data_count: int = 64
    hessian_opt_stability_ratio: float = 0.01
    hessian_opt_sort_hessian: bool = True
    hessian_opt_use_fast_strategy: bool = False
    gptq_float_target: bool = True
    finetune_level: int = 0
    block_max_layers: int = 4
    block_batch_size: int = 8
    block_learn_activations: bool = True
    block_activation_lr: float = 1e-3
    block_time_budget: float | None = None

    def __post_init__(self) -> None:
        if self.cle_relu6 not in ("bound", "relu", "skip"):
            raise ConfigError(f"cle_relu6 must be bound, relu or skip, got {self.cle_relu6!r}")
        if self.bias_correction not in (None, "empirical", "fast"):
            raise ConfigError(f"bias_correction must be empirical or fast, got {self.bias_correction!r}")
        if self.smoothquant is not None and self.smoothquant != "auto" and (
                isinstance(self.smoothquant, str) or not 0.0 <= self.smoothquant <= 1.0):
            raise ConfigError(f"smoothquant alpha must be in [0, 1] (e.g. 0.5) or auto, got {self.smoothquant!r}")
        if self.finetune_level not in (0, 1, 2):
            raise NotYetSupportedError(
                f"finetune_level {self.finetune_level}: levels above 2 are not available; use 1 (GPTQ rounding "
                "and bias correction) or 2 (block reconstruction and bias correction)")
        for name in ("bias_correction_data_count", "adaround_data_count", "adaround_optim_steps",
                     "adaround_batch_size", "hessian_opt_block_size", "hessian_opt_data_count", "block_max_layers",
                     "block_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.block_time_budget is not None and not self.block_time_budget > 0:
            raise ConfigError(f"block_time_budget must be a number of seconds > 0, got {self.block_time_budget}")
        if not 0.0 < self.block_activation_lr < 1.0:
            raise ConfigError(f"block_activation_lr must be in (0, 1), got {self.block_activation_lr}")
        if not 0.0 <= self.hessian_opt_stability_ratio < 1.0:
            raise ConfigError(f"hessian_opt_stability_ratio must be in [0, 1), got {self.hessian_opt_stability_ratio}")
        if self.adaround and self.gptq:
            raise ConfigError("choose one rounding algorithm: adaround or gptq, not both")

    @property
    def rounding(self) -> str | None:
        """The rounding algorithm asked for, if any: ``adaround``, ``gptq`` or ``blocks``."""
        if self.adaround:
            return "adaround"
        if self.finetune_level >= 2:
            return "blocks"
        return "gptq" if self.gptq or self.finetune_level >= 1 else None

    @property
    def bias(self) -> str | None:
        return self.bias_correction or ("empirical" if self.finetune_level >= 1 else None)

    def __bool__(self) -> bool:
        return bool(self.cle or self.smoothquant is not None or self.bias or self.rounding)


RECOVERY_FIELDS = {f.name: f for f in dataclasses.fields(Recovery)}
#: NeuroPilot's switches, as a user brings them (their sub-options share our names).
ALIASES = {"use_adaround": "adaround", "use_hessian_opt": "gptq", "use_bias_correction": "bias_correction",
           "weights_quantization_clipping_ratio": "weight_clipping_ratio"}


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
    repair: bool = True  # fix a result the collapse guard finds broken (mixed.repair)
    # the statistics of decomposed normalisations in the target's repair fallback from the start
    # (planning.overrides.statistics_path; pipeline.protect_statistics); off by default: on
    # magika it makes the guard quiet at top-1 0.948, where the repair reaches 0.988 (float 0.988)
    protect_statistics: bool = False
    # shape specialization (passes.specialize): static input shapes and pinned input values;
    # with ``specialize`` a model with control flow is also specialized at the shapes (and the
    # constant integer scalars) its calibration data has
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    fixed_inputs: tuple[tuple[str, float], ...] = ()
    specialize: bool = True
    # the If branches and Loop/Scan bodies that stay quantized too, each as a model of its own
    # calibrated on the samples that take it or on its iterations (edgequant.bodies)
    quantize_bodies: bool = True
    scheme: Scheme = DEFAULT_SCHEME
    target: str = "generic"
    per_channel_ops: tuple[str, ...] | None = None  # with per_channel: only these op types (None: all)
    workers: int = 1
    ray_address: str | None = None
    weight_clipping_ratio: float | None = None  # fixed share of each weight channel's range (else MSE search)
    # constant operands of Add/Mul quantized (as activations: onnxruntime's QLinearAdd/QLinearMul
    # need every input 8-bit, else the op runs in float between a DequantizeLinear and a
    # QuantizeLinear); set by the target profile
    quantize_constants: bool = True
    # what the target's compiler runs as one op, quantized once (planning.plan.FUSIONS): "relu"
    # (Conv/Gemm/… + Relu/Relu6), "pad" (a zero Pad into the Conv), "bias" (Conv/MatMul + a
    # constant Add), "silu" (x · Sigmoid(x)); set by the profile
    fusions: tuple[str, ...] = ()
    # ops without an entry in planning.ops quantized too (as TPU-MLIR quantizes every op)
    quantize_all_ops: bool = False
    # a symmetric activation that is never negative gets the unsigned type (zero point 0,
    # twice the resolution), as TPU-MLIR's symmetric int8 does for a calibrated min ≥ 0
    unsigned_nonnegative: bool = False
    # op types whose outputs the target quantizes over [0, 1] whatever calibration saw
    # (TPU-MLIR forces Sigmoid and Softmax to it)
    unit_range_ops: tuple[str, ...] = ()
    # op types whose inputs (read by them alone) take their output's parameters, as a compiler
    # that aligns Add/Concat inputs to the output does (esp-ppq, TPU-MLIR's Concat)
    tied_inputs: tuple[str, ...] = ()
    # op types whose output the target hands over in float (ESP-DL's Softmax)
    float_output_ops: tuple[str, ...] = ()
    # Convs (group 1) reading fewer input channels than this stay float, as onnxruntime runs
    # them faster (planning.plan.narrow_convs); 0 quantizes them; set by the profile (generic: 8)
    float_narrow_convs: int = 8
    recovery: Recovery = Recovery()

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
        if self.weight_clipping_ratio is not None and not 0.0 < self.weight_clipping_ratio <= 1.0:
            raise ConfigError(f"weight clipping ratio must be in (0, 1] (e.g. 0.9), got {self.weight_clipping_ratio}")
        if self.float_narrow_convs < 0:
            raise ConfigError(f"float_narrow_convs must be ≥ 0 (input channels; 0 quantizes every Conv), "
                              f"got {self.float_narrow_convs}")
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
_NULLABLE = {"num_samples", "ray_address", "per_channel_ops", "weight_clipping_ratio"}


def parse_options(base: QuantOptions | None, changes: Mapping[str, object]) -> QuantOptions:
    """``base`` (default options) with ``changes`` applied, strings parsed.

    ``changes`` maps field names to values; a value is taken as given (``None`` is a value, and
    only fields that may be ``None`` accept it). ``target`` applies the profile first, so the
    other changes win over it. ``method="entropy"``, ``activation_dtype="int16"``,
    ``overrides=["Conv_3=int16"]`` or ``{"Conv_3": "int16"}`` are parsed here.
    """
    changes = {ALIASES.get(k, k): _alias_value(k, v) for k, v in changes.items()}
    unknown = [k for k in changes if k not in FIELDS and k not in RECOVERY_FIELDS]
    if unknown:
        known = list(FIELDS) + list(RECOVERY_FIELDS)
        raise ConfigError(f"unknown option {unknown[0]!r}; did you mean {closest_names(unknown[0], known)}?")
    options = base or QuantOptions()
    if "target" in changes:  # the profile first; the explicit changes below win
        options = apply_target(options, _text("target", changes["target"]))
    parsed: dict[str, Any] = {k: _parse(k, v) for k, v in changes.items() if k != "target" and k in FIELDS}
    recovery = {k: _parse_recovery(k, v) for k, v in changes.items() if k in RECOVERY_FIELDS}
    if recovery:
        parsed["recovery"] = dataclasses.replace(parsed.get("recovery", options.recovery), **recovery)
    return dataclasses.replace(options, **parsed)


def _alias_value(key: str, value: object) -> object:
    """``use_bias_correction=True`` is the empirical form; False turns it off."""
    if key == "use_bias_correction" and isinstance(value, bool):
        return "empirical" if value else None
    return value


def _parse_recovery(key: str, value: object) -> object:
    kind = RECOVERY_FIELDS[key].type
    if value is None:
        if "None" not in str(kind):
            raise ConfigError(f"option {key} cannot be None; leave it out for the default")
        return None
    want = {"bool": bool, "int": int, "float": float}.get(str(kind).split(" |")[0])
    if key == "bias_correction":
        want = str
    if key == "smoothquant":  # a number, or "auto"
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else value
        except (TypeError, ValueError):
            raise ConfigError(f"option smoothquant must be an alpha in [0, 1] or auto, got {value!r}") from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is not None and (not isinstance(value, want) or (want is not bool and isinstance(value, bool))):
        raise ConfigError(f"option {key} must be {want.__name__}, got {value!r}")
    return value


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
    if key == "input_shapes":
        return parse_input_shapes(value)
    if key == "fixed_inputs":
        return tuple((n, parse_number(n, v)) for n, v in _named(key, value))
    if key == "fusions":
        from edgequant.planning.plan import FUSIONS

        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or any(f not in FUSIONS for f in items):
            raise ConfigError(f"option fusions must list some of {', '.join(FUSIONS)}, got {value!r}")
        return tuple(dict.fromkeys(items))
    kind = _SIMPLE.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ConfigError(f"option {key} must be {kind.__name__}, got {value!r}")
    return value


_SIMPLE: dict[str, type] = {
    "percentile": float, "collapse_cosine": float, "repair": bool, "protect_statistics": bool, "specialize": bool, "quantize_bodies": bool, "quantize_constants": bool, "quantize_all_ops": bool, "unsigned_nonnegative": bool, "weight_clipping_ratio": float, "activation_symmetric": bool, "weight_symmetric": bool,
    "per_channel": bool, "quantize_outputs": bool, "simplify": bool, "batch_size": int, "num_samples": int,
    "eval_samples": int, "workers": int, "device": str, "ray_address": str, "float_narrow_convs": int,
}


def _named(key: str, value: object) -> list[tuple[str, object]]:
    """``{"x": V}``, ``"x=V"``, ``["x=V", ...]`` or ``[("x", V), ...]`` as (name, V) pairs."""
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Iterable):
        raise ConfigError(f"option {key} must map input names to values (NAME=VALUE), got {value!r}")
    pairs: list[tuple[str, object]] = []
    for item in items:
        if isinstance(item, str):
            name, sep, text = item.partition("=")
            if not sep or not name.strip() or not text.strip():
                raise ConfigError(f"option {key}: {item!r} must read NAME=VALUE (e.g. input=1x512, sr=16000)")
            pairs.append((name.strip(), text.strip()))
        elif isinstance(item, tuple | list) and len(item) == 2:
            pairs.append((str(item[0]), item[1]))
        else:
            raise ConfigError(f"option {key}: {item!r} must read NAME=VALUE (e.g. input=1x512, sr=16000)")
    return pairs


def parse_input_shapes(value: object) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Named shapes: ``{"x": (1, 512)}``, ``"x=1x512"``, ``["x=1x512", ...]`` or ``[("x", "1x512"), ...]``."""
    return tuple((n, parse_shape(n, v)) for n, v in _named("input_shapes", value))


def parse_shape(name: str, value: object) -> tuple[int, ...]:
    """``"1x512"``, ``"1,512"`` or ``(1, 512)``; every dimension a positive integer."""
    parts = value.replace(",", "x").split("x") if isinstance(value, str) else value
    try:
        if not isinstance(parts, Iterable):
            raise TypeError
        dims = tuple(int(str(d).strip()) for d in parts) if str(value).strip() else ()
    except (TypeError, ValueError):
        raise ConfigError(f"input shape for {name!r}: {value!r} is not a shape like 1x3x224x224") from None
    if any(d < 1 for d in dims):
        raise ConfigError(f"input shape for {name!r}: {value!r} has a dimension below 1")
    return dims


def parse_number(name: str, value: object) -> float:
    """A finite number an input is pinned to (``16000``, ``0.5``)."""
    try:
        if not isinstance(value, int | float | str | np.number):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"fixed input {name!r}: {value!r} is not a number") from None
    if not np.isfinite(number):
        raise ConfigError(f"fixed input {name!r}: {value!r} is not a finite number")
    return int(number) if number.is_integer() else number


def parse_overrides(value: object) -> tuple[Override, ...]:
    """``["Conv_3=int16", "op:Softmax=float"]``, ``{"Conv_3": "int16"}`` or Override values."""
    if isinstance(value, Mapping):
        return tuple(Override(str(k), parse_precision(str(v))) for k, v in value.items())
    if isinstance(value, str | Override):
        value = [value]
    if not isinstance(value, Iterable):
        raise ConfigError(f"overrides must be a list of SELECTOR=PRECISION texts or Override values, got {value!r}")
    return tuple(v if isinstance(v, Override) else Override.parse(str(v)) for v in value)
