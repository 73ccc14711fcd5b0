"""The config file schema (XQuant layout, accepted as-is) and its resolution to options.

Keys whose feature is not available yet are rejected with a message saying so, never ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from edgequant.calibration.method import Method
from edgequant.data.inputs import InputSettings
from edgequant.errors import (
    ConfigError,
    EdgequantError,
    closest_names,
    not_a_file,
    parse_guarded,
    read_text,
)
from edgequant.planning.options import QuantOptions, Recovery, parse_options
from edgequant.planning.overrides import FLOAT, Override
from edgequant.planning.selectors import After, Between
from edgequant.quant.dtypes import QuantDType
from edgequant.targets import apply_target


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelParameters(_Strict):
    onnx_model: str = ""
    output_prefix: str = ""
    working_dir: str = ""
    skip_onnxsim: bool = False


class InputParameters(_Strict):
    input_name: str | None = None
    input_shape: list[int | str] | None = None
    dtype: str | None = None
    file_type: str | None = None
    color_format: str = "rgb"
    mean_value: list[float] | None = None
    std_value: list[float] | None = None
    preprocess_file: str | None = None
    data_list_path: str | None = None
    layout: str | None = Field(None, description="edgequant: NCHW or NHWC (default: guessed from the shape)")


class CalibrationParameters(_Strict):
    calibration_step: int = Field(100, ge=1)
    calibration_device: str = "auto"
    calibration_type: str = "default"
    input_parametres: list[InputParameters] | None = Field(
        None, validation_alias=AliasChoices("input_parametres", "input_parameters"))
    batch_size: int = Field(1, ge=1, description="edgequant: samples per inference batch")


class CustomSetting(_Strict):
    """A subgraph between boundary edges, with its own precision and calibration."""

    input_names: list[str]
    output_names: list[str]
    precision_level: int | None = Field(None, ge=0, le=4)
    calibration_type: str | None = None
    max_percentile: float | None = None


class QuantizationParameters(_Strict):
    analysis_enable: bool = False
    precision_level: int = Field(0, ge=0, le=4, description="0 int8, 1 int8 + 16-bit sensitive ops, 2 16-bit "
                                 "activations, 3 16-bit activations and weights, 4 float")
    finetune_level: int = Field(0, description="0 none, 1 GPTQ rounding and bias correction, 2 GPTQ then "
                                "block reconstruction from its rounding, and bias correction")
    cle: bool | None = Field(None, description="edgequant: cross-layer equalization")
    smoothquant: float | str | None = Field(None, description="edgequant: SmoothQuant alpha (0-1), or auto (chosen per activation)")
    bias_correction: str | None = Field(None, description="edgequant: empirical or fast")
    adaround: bool | None = Field(None, description="edgequant: AdaRound weight rounding (PyTorch)")
    gptq: bool | None = Field(None, description="edgequant: Hessian-based weight rounding")
    use_adaround: bool | None = Field(None, description="NeuroPilot: same as adaround")
    adaround_batch_size: int | None = None
    adaround_data_count: int | None = None
    adaround_optim_lr: float | None = None
    adaround_optim_steps: int | None = None
    use_bias_correction: bool | None = Field(None, description="NeuroPilot: empirical bias correction")
    bias_correction_data_count: int | None = None
    use_hessian_opt: bool | None = Field(None, description="NeuroPilot: same as gptq")
    hessian_opt_block_size: int | None = None
    hessian_opt_data_count: int | None = None
    hessian_opt_stability_ratio: float | None = None
    hessian_opt_sort_hessian: bool | None = None
    hessian_opt_use_fast_strategy: bool | None = None
    weights_quantization_clipping_ratio: float | None = Field(
        None, description="NeuroPilot: keep this share (0-1] of each weight channel's range instead of the MSE search")
    repair: bool = Field(True, description="edgequant: when the collapse guard finds the result broken, repair it "
                         "before writing (recovery algorithms or minmax ranges, then mixed precision); false writes the plain result")
    protect_statistics: bool = Field(False, description="edgequant: keep the statistics of decomposed normalisations "
                                     "in the target's repair fallback (float on generic, int16 on NPUs) from the start")
    quantize_bodies: bool = Field(True, description="edgequant: quantize inside the If branches and Loop/Scan bodies "
                                  "that stay, each as a model of its own; false leaves them float (--float-bodies)")
    float_narrow_convs: int | None = Field(None, description="edgequant: Convs (group 1) reading fewer input channels "
                                           "than this stay float (the generic target: 8, as onnxruntime runs them faster "
                                           "in float); 0 quantizes every Conv (--quantize-narrow-convs)")
    max_percentile: float = 0.9999
    custom_setting: list[CustomSetting] | None = None
    truncate_var_names: list[str] | None = None
    activation_dtype: str = Field("uint8", description="edgequant: int8, uint8, int16, uint16")
    weight_dtype: str = Field("int8", description="edgequant: int8, uint8")
    per_channel: bool = Field(True, description="edgequant: per-channel weights")
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    target: str | None = Field(None, description="edgequant: target profile (edgequant targets lists them)")
    overrides: list[str] = Field(
        default_factory=list,
        description="edgequant: per-layer precision, SELECTOR=PRECISION (e.g. Conv_12=int16, op:Softmax=float)")


class ConfigFile(_Strict):
    model_parameters: ModelParameters = ModelParameters()
    calibration_parameters: CalibrationParameters = CalibrationParameters()
    quantization_parameters: QuantizationParameters = QuantizationParameters()


@dataclass(frozen=True)
class ResolvedConfig:
    """A config file turned into what the pipeline needs."""

    model_path: Path | None
    output_path: Path | None
    options: QuantOptions
    input_names: tuple[str | None, ...]
    settings: tuple[InputSettings, ...]
    input_dtypes: tuple[str | None, ...]
    analyze: bool = False


def json_schema() -> dict:
    return ConfigFile.model_json_schema(by_alias=False)


_SECTIONS: dict[str, type[BaseModel]] = {
    "model_parameters": ModelParameters,
    "calibration_parameters": CalibrationParameters,
    "quantization_parameters": QuantizationParameters,
    "input_parametres": InputParameters,
    "input_parameters": InputParameters,
}


def _key_error(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parents = [str(p) for p in err["loc"][:-1] if not isinstance(p, int)]
        model = _SECTIONS.get(parents[-1], ConfigFile) if parents else ConfigFile
        hint = closest_names(str(err["loc"][-1]), list(model.model_fields))
        return f"config key {loc!r} is not recognised; did you mean {hint}?"
    return f"config key {loc!r}: {err['msg']}"


def read_config_file(source: str | os.PathLike | dict) -> tuple[ConfigFile, Path]:
    if isinstance(source, dict):
        data, base = source, Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(not_a_file("config", path))
        text = read_text(path, "config")
        try:
            data = parse_guarded(lambda: json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text),
                                 path, "config")
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}") from None
        base = path.resolve().parent
    if not isinstance(data, dict):
        raise ConfigError("the config file must hold a mapping with model_parameters, calibration_parameters, quantization_parameters")
    try:
        return ConfigFile.model_validate(data), base
    except ValidationError as exc:
        raise ConfigError(_key_error(exc.errors()[0])) from None


RECOVERY_KEYS = ("finetune_level", "cle", "smoothquant", "bias_correction", "adaround", "gptq", "use_adaround",
                 "adaround_batch_size", "adaround_data_count", "adaround_optim_lr", "adaround_optim_steps",
                 "use_bias_correction", "bias_correction_data_count", "use_hessian_opt", "hessian_opt_block_size",
                 "hessian_opt_data_count", "hessian_opt_stability_ratio", "hessian_opt_sort_hessian",
                 "hessian_opt_use_fast_strategy")


def config_recovery(q: QuantizationParameters) -> Recovery:
    """The recovery options the file sets (edgequant's, XQuant's and NeuroPilot's names)."""
    given = {k: getattr(q, k) for k in RECOVERY_KEYS if k in q.model_fields_set and getattr(q, k) is not None}
    try:
        return parse_options(None, given).recovery
    except EdgequantError as exc:
        raise type(exc)(f"quantization_parameters: {exc}") from None


def _percent(value: float) -> float:
    return value * 100.0 if value <= 1.0 else value


def config_overrides(q: QuantizationParameters) -> tuple[Override, ...]:
    """precision_level, custom_setting, truncate_var_names and overrides, in that order."""
    out: list[Override] = []
    if q.precision_level:
        out.append(Override("re:.*", level=q.precision_level))
    for cs in q.custom_setting or []:
        method = Method.parse(cs.calibration_type) if cs.calibration_type else None
        pct = _percent(cs.max_percentile) if cs.max_percentile is not None else None
        if pct is not None and method is None:
            method = Method.PERCENTILE
        out.append(Override(Between(tuple(cs.input_names), tuple(cs.output_names)), level=cs.precision_level,
                            method=method, percentile=pct))
    if q.truncate_var_names:
        out.append(Override(After(tuple(q.truncate_var_names)), FLOAT))
    return tuple(out) + tuple(Override.parse(o) for o in q.overrides)


def _resolve_path(text: str, base: Path) -> Path:
    p = Path(text)
    if p.is_absolute() or p.exists():
        return p
    return base / p


def load_config(source: str | os.PathLike | dict) -> ResolvedConfig:
    """Read, validate and resolve a config file (JSON or YAML, XQuant layout)."""
    cfg, base = read_config_file(source)
    m, c, q = cfg.model_parameters, cfg.calibration_parameters, cfg.quantization_parameters
    model_path = _resolve_path(m.onnx_model, base) if m.onnx_model else None
    output = None
    if model_path is not None:
        folder = _resolve_path(m.working_dir, base) if m.working_dir else model_path.parent
        prefix = m.output_prefix or model_path.stem
        output = folder / (prefix if prefix.endswith(".onnx") else prefix + ".q.onnx")
    pct = _percent(q.max_percentile)
    numeric: dict[str, Any] = {"activation_dtype": QuantDType.parse(q.activation_dtype), "weight_dtype": QuantDType.parse(q.weight_dtype),
               "activation_symmetric": q.activation_symmetric, "weight_symmetric": q.weight_symmetric,
               "per_channel": q.per_channel}
    options = QuantOptions(
        method=Method.parse(c.calibration_type),
        percentile=pct,
        **numeric,
        batch_size=c.batch_size,
        num_samples=c.calibration_step,
        simplify=not m.skip_onnxsim,
        device=c.calibration_device,
        overrides=config_overrides(q),
        recovery=config_recovery(q),
        weight_clipping_ratio=q.weights_quantization_clipping_ratio,
        repair=q.repair,
        protect_statistics=q.protect_statistics,
        quantize_bodies=q.quantize_bodies,
        float_narrow_convs=q.float_narrow_convs if q.float_narrow_convs is not None else QuantOptions.float_narrow_convs,
    )
    if q.target:  # the profile decides what the file does not set explicitly
        explicit = {k for k in numeric if k in q.model_fields_set}
        if q.weights_quantization_clipping_ratio is not None:
            explicit.add("weight_clipping_ratio")
        if q.float_narrow_convs is not None:
            explicit.add("float_narrow_convs")
        options = apply_target(options, q.target, frozenset(explicit))
    inputs = c.input_parametres or []
    settings = tuple(_settings(p, base) for p in inputs)
    return ResolvedConfig(model_path, output, options, tuple(p.input_name for p in inputs),
                          settings, tuple(p.dtype for p in inputs), q.analysis_enable)


PRESETS = {
    "IMAGENET": ((103.94, 116.78, 123.68), (57.0, 57.0, 57.0), "bgr"),
    "PT_IMAGENET": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "rgb"),
}


def _settings(p: InputParameters, base: Path) -> InputSettings:
    st = InputSettings(
        file_type=p.file_type,
        color_format=p.color_format,
        mean=tuple(p.mean_value) if p.mean_value else None,
        std=tuple(p.std_value) if p.std_value else None,
        layout=p.layout,
        shape=tuple(1 if isinstance(d, str) else int(d) for d in p.input_shape) if p.input_shape else None,
        data_path=str(_resolve_path(p.data_list_path, base)) if p.data_list_path else None,
    )
    pre = p.preprocess_file or None
    if pre and pre.upper() in PRESETS:
        mean, std, color = PRESETS[pre.upper()]  # what the user wrote beside the preset wins
        color = p.color_format if "color_format" in p.model_fields_set else color
        return replace(st, mean=st.mean or mean, std=st.std or std, color_format=color)
    if pre:
        path, sep, fn = pre.rpartition(":")
        pre = f"{_resolve_path(path, base)}:{fn}" if sep else pre
    return replace(st, preprocess=pre)
