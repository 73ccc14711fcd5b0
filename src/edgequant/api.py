"""The public pipeline: load → prepare → plan → calibrate → assign → insert Q/DQ → evaluate."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import ModelProto

from edgequant.analysis.metrics import FidelityAccumulator
from edgequant.calibration.collect import batched, collect_ranges, run_checked
from edgequant.data.inputs import InputSettings, InputSpec, model_inputs
from edgequant.data.open import open_calibration
from edgequant.data.sources import CalibrationSource
from edgequant.errors import (
    CalibrationDataError,
    ConfigError,
    ModelLoadError,
    TensorNameError,
    closest_names,
)
from edgequant.ir.model import ensure_opset, load_model, opset_of, save_model, skeleton
from edgequant.passes.pipeline import PassResult, prepare_model
from edgequant.planning.options import Method, QuantOptions
from edgequant.planning.overrides import Override, parse_precision
from edgequant.planning.plan import QuantPlan, build_plan
from edgequant.quant.assign import activation_params
from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import QuantParams
from edgequant.runtime.session import make_session
from edgequant.transform.qdq import insert_qdq

if TYPE_CHECKING:
    from edgequant.config.schema import ResolvedConfig
    from edgequant.mixed.guard import Collapse

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    cosine: float
    sqnr_db: float


@dataclass
class Summary:
    quantized_ops: dict[str, int]
    float_ops: dict[str, int]
    subgraph_float_ops: int
    calibration_samples: int
    eval_samples: int
    eval_on_calibration: bool
    calibration_seconds: float
    total_seconds: float
    opset: tuple[int, int]
    passes: list[PassResult]
    fidelity: list[OutputFidelity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    precision: dict[str, str] = field(default_factory=dict)  # node → precision set by an override
    collapse: Collapse | None = None



@dataclass
class QuantizeResult:
    """What ``quantize`` returns: the model, its plan, ranges, parameters and a summary."""

    model: ModelProto
    float_model: ModelProto
    plan: QuantPlan
    ranges: dict[str, tuple[float, float]]
    params: dict[str, QuantParams]
    summary: Summary
    options: QuantOptions

    def save(self, path: str | os.PathLike) -> Path:
        """Write the quantized model atomically."""
        return save_model(self.model, path)


_OPTION_FIELDS = {f.name for f in dataclasses.fields(QuantOptions)}


def make_options(base: QuantOptions | None = None, **overrides) -> QuantOptions:
    """QuantOptions from keyword overrides; strings are parsed (``method="entropy"``)."""
    unknown = [k for k in overrides if k not in _OPTION_FIELDS]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; did you mean {closest_names(unknown[0], _OPTION_FIELDS)}?")
    if overrides.get("target") is not None:  # the profile first; explicit options below win
        from edgequant.targets import apply_target

        base = apply_target(base or QuantOptions(), overrides.pop("target"))
    parsed = {}
    for key, value in overrides.items():
        if value is None and key != "num_samples":
            continue
        if key == "method" and isinstance(value, str):
            value = Method.parse(value)
        elif key in ("activation_dtype", "weight_dtype") and isinstance(value, str):
            value = QuantDType.parse(value)
        elif key == "overrides":
            value = _parse_overrides(value)
        parsed[key] = value
    return dataclasses.replace(base or QuantOptions(), **parsed)


def _parse_overrides(value) -> tuple[Override, ...]:
    """``["Conv_3=int16", "op:Softmax=float"]``, ``{"Conv_3": "int16"}`` or Override values."""
    if isinstance(value, dict):
        return tuple(Override(k, parse_precision(str(v))) for k, v in value.items())
    if isinstance(value, str | Override):
        value = [value]
    return tuple(v if isinstance(v, Override) else Override.parse(str(v)) for v in value)


def _match_settings(specs: list[InputSpec], cfg: ResolvedConfig | None,
                    settings: list[InputSettings] | None) -> tuple[list[InputSpec], list[InputSettings] | None]:
    if settings is not None or cfg is None or not cfg.settings:
        return specs, settings
    if len(cfg.settings) != len(specs):
        raise ConfigError(
            f"calibration input_parametres size ({len(cfg.settings)}) should equal the model's "
            f"inputs size ({len(specs)}: {', '.join(s.name for s in specs)})")
    names = [s.name for s in specs]
    out_specs = list(specs)
    for i, (name, st) in enumerate(zip(cfg.input_names, cfg.settings)):
        if name is not None and name != specs[i].name:
            if name not in names:
                raise TensorNameError(f"config input_name {name!r} is not an input of the model; did you mean {closest_names(name, names)}?")
            raise ConfigError(f"config input_name {name!r} is input #{names.index(name)} of the model, listed as #{i}; list inputs in the model's order ({', '.join(names)})")
        _check_dtype(specs[i], cfg.input_dtypes[i])
        out_specs[i] = specs[i].with_shape(st.shape)
    return out_specs, list(cfg.settings)


def _check_dtype(spec: InputSpec, given: str | None) -> None:
    """A config ``dtype`` must name the model's own input type (it is checked, not converted)."""
    if not given:
        return
    try:
        wanted = np.dtype(given)
    except TypeError:
        raise ConfigError(f"config dtype {given!r} for input {spec.name!r} is not a dtype (e.g. float32, int64)") from None
    if wanted != spec.dtype:
        raise ConfigError(
            f"config dtype {given} for input {spec.name!r} does not match the model's {spec.dtype}; "
            f"set dtype to {spec.dtype} or leave it out")


def _split_counts(total: int, options: QuantOptions) -> tuple[int, int]:
    """How many samples calibrate and how many are held out for the fidelity check."""
    n_eval = min(options.eval_samples, total // 5) if total >= 5 else 0
    n_calib = total - n_eval
    if options.num_samples is not None:
        n_calib = min(n_calib, options.num_samples)
    return n_calib, n_eval


@dataclass
class Calibrated:
    """The state after calibration, from which models with other plans are assembled cheaply."""

    prepared: ModelProto
    plan: QuantPlan
    observers: dict
    source: CalibrationSource
    opts: QuantOptions
    n_calib: int
    n_eval: int
    notes: list[str]
    passes: list[PassResult]
    from_opset: int
    calib_seconds: float
    start: float

    def assemble(self, plan: QuantPlan) -> tuple[ModelProto, dict[str, QuantParams]]:
        """The QDQ model for ``plan`` (whose tensors were all observed) without recalibrating."""
        params = activation_params(plan, self.observers)
        qmodel = insert_qdq(self.prepared, plan, params)
        qmodel.producer_name, qmodel.producer_version = "edgequant", _version()
        return qmodel, params

    def eval_samples(self) -> tuple[int, int]:
        """(first index, count) of the samples the fidelity check uses."""
        if self.n_eval == 0:
            return 0, min(self.n_calib, self.opts.eval_samples)
        return self.n_calib, self.n_eval


def calibrate(model: str | os.PathLike | ModelProto | None, calibration=None, *,
              config: str | os.PathLike | dict | ResolvedConfig | None = None, options: QuantOptions | None = None,
              input_settings: list[InputSettings] | None = None, progress: Progress | None = None,
              min_opset: int = 0, **overrides) -> Calibrated:
    """Load, prepare, plan and calibrate (the stages before parameters are assigned)."""
    start = time.perf_counter()
    cfg = None
    if config is not None:
        from edgequant.config.schema import ResolvedConfig, load_config

        cfg = config if isinstance(config, ResolvedConfig) else load_config(config)
    base = options or (cfg.options if cfg else None)
    opts = make_options(base, **overrides)
    if model is None:
        if cfg is None or cfg.model_path is None:
            raise ConfigError("no model given: pass MODEL or set model_parameters.onnx_model in the config")
        model = cfg.model_path
    original = load_model(model)
    specs, settings = _match_settings(model_inputs(original), cfg, input_settings)
    from_opset = opset_of(original)
    try:
        onnx.checker.check_model(skeleton(original), full_check=False)
    except Exception as exc:
        if original.ByteSize() < 2_000_000_000:
            raise ModelLoadError(f"the model is not valid ONNX: {str(exc).splitlines()[0][:300]}") from None
    prepared, opts, notes = _upgrade(original, opts, min_opset)
    del original  # the upgrade made a copy, or ``prepared`` is the same object
    passes = prepare_model(prepared, simplify=opts.simplify)
    plan = build_plan(prepared, opts)
    source = open_calibration(calibration, specs, settings, opts.batch_size)
    if opts.eval_samples == 0 and opts.num_samples is not None:
        n_calib, n_eval = opts.num_samples, 0  # nothing held out: no need to count the files
    else:
        n_calib, n_eval = _split_counts(len(source), opts)
    t0 = time.perf_counter()
    observers, n_calib = collect_ranges(prepared, plan.observed, source, opts, n_calib, progress,
                                        methods=plan.calibration)
    if n_calib == 0:
        raise CalibrationDataError("the calibration data yields 0 samples")
    return Calibrated(prepared, plan, observers, source, opts, n_calib, n_eval, notes, passes, from_opset,
                      time.perf_counter() - t0, start)


def quantize(model: str | os.PathLike | ModelProto | None, calibration=None, *,
             config: str | os.PathLike | dict | ResolvedConfig | None = None, options: QuantOptions | None = None,
             input_settings: list[InputSettings] | None = None, progress: Progress | None = None,
             **overrides) -> QuantizeResult:
    """Quantize a float ONNX model with calibration data; see ``QuantOptions`` for overrides.

    ``calibration``: a path (folder of .npz/.npy/images/raw, list file, single file), one path
    per input, or an iterable of arrays (single-input models) or dicts keyed by input name.
    """
    state = calibrate(model, calibration, config=config, options=options, input_settings=input_settings,
                      progress=progress, **overrides)
    return finish(state, state.plan, progress)


def finish(state: Calibrated, plan: QuantPlan, progress: Progress | None = None) -> QuantizeResult:
    """Assemble ``plan``, check its fidelity on held-out samples (with the collapse guard)."""
    qmodel, params = state.assemble(plan)
    opts = state.opts
    ranges = {a.root: plan.pinned.get(a.root) or state.observers[a.root].range(a.dtype, a.symmetric)
              for a in plan.activations.values()}
    first, count = state.eval_samples()
    fidelity = _evaluate(state.prepared, qmodel, state.source, opts, first, count, progress)
    summary = Summary(dict(plan.quantized_ops), dict(plan.float_ops), plan.subgraph_float_ops,
                      state.n_calib, count, state.n_eval == 0, state.calib_seconds, 0.0,
                      (state.from_opset, opset_of(qmodel)), state.passes, fidelity,
                      list(state.notes), dict(plan.precision))
    result = QuantizeResult(qmodel, state.prepared, plan, ranges, params, summary, opts)
    if opts.collapse_cosine > 0 and fidelity and min(f.cosine for f in fidelity) < opts.collapse_cosine:
        from edgequant.mixed.guard import collapse_report

        summary.collapse = collapse_report(state, result, progress)
        log.warning("quantized outputs collapsed (cosine %.3f < %.2f); most sensitive layers: %s",
                    summary.collapse.cosine, opts.collapse_cosine, ", ".join(summary.collapse.layers))
    summary.total_seconds = time.perf_counter() - state.start
    return result


def _upgrade(model: ModelProto, opts: QuantOptions, min_opset: int = 0) -> tuple[ModelProto, QuantOptions, list[str]]:
    """Upgrade to the opset the options need; if per-channel weights are what cannot be had
    (the converter fails on this model), fall back to per-tensor weights and say so."""
    try:
        return ensure_opset(model, max(opts.required_opset, min_opset)), opts, []
    except ModelLoadError as exc:
        fallback = dataclasses.replace(opts, per_channel=False)
        if not opts.per_channel or fallback.required_opset > opset_of(model):
            raise
        note = (f"per-tensor weights: the model stays at opset {opset_of(model)} because the upgrade "
                f"to 13 that per-channel weights need failed ({exc})")
        log.warning(note)
        return model, fallback, [note]


def _version() -> str:
    from edgequant import __version__

    return __version__


def _evaluate(float_model: ModelProto, qmodel: ModelProto, source: CalibrationSource,
              opts: QuantOptions, start: int, count: int, progress: Progress | None) -> list[OutputFidelity]:
    """Compare float and quantized outputs on ``count`` samples from index ``start``."""
    if count == 0:
        return []
    fsess = make_session(float_model, device=opts.device)
    qsess = make_session(qmodel, device=opts.device)
    names = [o.name for o in fsess.get_outputs()]
    acc = {n: FidelityAccumulator() for n in names}
    can_batch = all(not s.batch_fixed for s in source.specs)
    samples = itertools.islice(source.samples(), start, start + count)
    done = 0
    for feed, n in batched(samples, opts.batch_size if can_batch else 1, can_batch):
        refs, tests = run_checked(fsess, names, feed, start + done), run_checked(qsess, names, feed, start + done)
        for name, ref, test in zip(names, refs, tests):
            acc[name].update(np.asarray(ref), np.asarray(test))
        done += n
        if progress:
            progress("evaluating", done, count)
    return [OutputFidelity(n, a.cosine, a.sqnr_db) for n, a in acc.items() if a.count]
