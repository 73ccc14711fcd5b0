"""The public pipeline: load → prepare → plan → calibrate → assign → insert Q/DQ → evaluate.

This module is the edge: it reads what a user gives (model paths or protos, config files,
calibration paths or arrays, option keywords), turns it into typed values once, and runs the
stages of ``edgequant.pipeline`` on them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from onnx import ModelProto

from edgequant.calibrated import CalibratedModel
from edgequant.config.schema import ResolvedConfig, load_config
from edgequant.data.inputs import InputSettings, InputSpec, model_inputs
from edgequant.data.open import open_calibration
from edgequant.errors import ConfigError, TensorNameError, closest_names
from edgequant.ir.model import load_model
from edgequant.pipeline import calibrate as calibrate_prepared
from edgequant.pipeline import (
    check_onnx,
    finish_repaired,
    prepare,
    protect_statistics,
    specialization,
)
from edgequant.planning.options import QuantOptions, parse_options
from edgequant.result import OutputFidelity, QuantizeResult, Summary

__all__ = ["OutputFidelity", "QuantizeResult", "Summary", "calibrate", "make_options", "quantize"]

#: ``progress(stage, done, total)``; a stage may carry a note after " · " (block reconstruction's
#: ``"block reconstruction · block MSE −41%"``): the same stage, further on
Progress = Callable[[str, int, int], None]
ModelArg = str | os.PathLike | ModelProto | None
ConfigArg = str | os.PathLike | dict | ResolvedConfig | None


def make_options(base: QuantOptions | None = None, **changes: Any) -> QuantOptions:
    """QuantOptions from keywords; strings are parsed (``method="entropy"``); see
    ``planning.options.parse_options``."""
    return parse_options(base, changes)


def resolve_config(config: ConfigArg) -> ResolvedConfig | None:
    if config is None or isinstance(config, ResolvedConfig):
        return config
    return load_config(config)


def onnx_model(model: Any, example_inputs: Any = None, layout: str | None = None,
               options: QuantOptions | None = None, changes: dict | None = None,
               cfg: ResolvedConfig | None = None) -> Any:
    """``model`` as it is, or a PyTorch model (``nn.Module``, TorchScript file, ``ExportedProgram``)
    exported by ``frontends.torch.from_torch`` on ``example_inputs``, or at the ``input_shapes``
    of the changes, the options or the config (each input's ``input_name`` and ``input_shape``),
    in ``layout`` (else the config's first input's, else NCHW)."""
    from edgequant.frontends.torch import is_torch_model

    if not is_torch_model(model):
        if example_inputs is not None:
            raise ConfigError("example_inputs are for PyTorch models; an ONNX model has its input shapes")
        return model
    from edgequant.frontends.torch import from_torch

    shapes = (changes or {}).get("input_shapes") or (options.input_shapes if options else None)
    if not shapes and cfg is not None and cfg.settings and all(st.shape for st in cfg.settings):
        shapes = [(name or f"input_{k}", st.shape) for k, (name, st) in enumerate(zip(cfg.input_names, cfg.settings))]
    layout = layout or next((st.layout for st in (cfg.settings if cfg else ()) if st.layout), None)
    return from_torch(model, example_inputs, input_shapes=shapes or None, layout=layout or "NCHW")


def calibrate(model: ModelArg, calibration=None, *, config: ConfigArg = None, options: QuantOptions | None = None,
              input_settings: list[InputSettings] | None = None, progress: Progress | None = None,
              min_opset: int = 0, transform_fn: Callable[[Any], Any] | None = None,
              example_inputs: Any = None, layout: str | None = None, **changes: Any) -> CalibratedModel:
    """Load, prepare, plan and calibrate: the state every later stage reads.

    ``changes`` are ``QuantOptions`` fields (``method="entropy"``, ``target="espdl"``…) applied
    over ``options`` (or the config's options, or the defaults). ``transform_fn`` maps each item
    of the calibration data to the model's inputs; ``example_inputs`` and ``layout`` are for
    PyTorch models (``quantize``).
    """
    started = time.perf_counter()
    cfg = resolve_config(config)
    opts = parse_options(options or (cfg.options if cfg else None), changes)
    if model is None:
        if cfg is None or cfg.model_path is None:
            raise ConfigError("no model given: pass MODEL or set model_parameters.onnx_model in the config")
        model = cfg.model_path
    original = load_model(onnx_model(model, example_inputs, layout, opts, cfg=cfg))
    specs, settings = _match_settings(model_inputs(original), cfg, input_settings)
    check_onnx(original)
    opts = protect_statistics(original, opts)
    source = open_calibration(calibration, specs, settings, opts.batch_size, transform_fn)
    prepared = prepare(original, opts, min_opset, specialization(original, opts, source))
    del original  # ``prepared`` holds the (upgraded) model; the upgrade made a copy, or edited this one
    return calibrate_prepared(prepared, source, progress, started)


def quantize(model: ModelArg, calibration=None, *, config: ConfigArg = None, options: QuantOptions | None = None,
             input_settings: list[InputSettings] | None = None, progress: Progress | None = None,
             exports: tuple[str, ...] = (), transform_fn: Callable[[Any], Any] | None = None,
             example_inputs: Any = None, layout: str | None = None, **changes: Any) -> QuantizeResult:
    """Quantize a float ONNX model with calibration data; ``changes`` are ``QuantOptions``
    fields (``method="entropy"``, ``per_channel=False``, ``overrides=["Conv_3=int16"]``…).

    ``calibration``: a path (folder of .npz/.npy/images/raw, list file, single file), one path
    per input, a list of arrays (single-input models) or dicts keyed by input name, or a data
    object streamed as it is: an onnxruntime ``CalibrationDataReader``, a PyTorch ``DataLoader``
    or ``Dataset``, a generator or any iterable (``data.stream``). ``transform_fn`` maps one
    item to the inputs, e.g. ``lambda item: item[0]`` for ``(image, label)`` pairs. The first
    samples calibrate and the next ``eval_samples`` check fidelity (``split_samples``).

    ``model`` may be a PyTorch model: an ``nn.Module``, a TorchScript file or an
    ``ExportedProgram``, exported once (``from_torch``) on ``example_inputs`` or at
    ``input_shapes``, in ``layout`` (``"NHWC"``: channels-last in and out; the calibration data
    is given in that layout too).

    When the collapse guard finds the result broken, it is repaired before it is returned
    (``mixed.repair``: recovery algorithms or minmax ranges, then mixed precision; ``Summary.repair`` says
    what changed); ``repair=False`` returns the plain result with the guard's finding.
    ``exports``: the parameter-file formats the result will be written to (``export_params``);
    the repair adds no recovery step those files cannot describe.
    """
    cfg = resolve_config(config)
    model = onnx_model(model if model is not None else (cfg.model_path if cfg else None), example_inputs, layout,
                       options, changes, cfg)
    state = calibrate(model, calibration, config=cfg, options=options, input_settings=input_settings,
                      progress=progress, transform_fn=transform_fn, **changes)
    def recalibrate(opts: QuantOptions, min_opset: int) -> CalibratedModel:
        return calibrate(model, state.source, config=cfg, options=opts, input_settings=input_settings,
                         progress=progress, min_opset=min_opset)
    return finish_repaired(state, recalibrate, progress, exports)


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
