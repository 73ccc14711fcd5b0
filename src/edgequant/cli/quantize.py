"""``edgequant quantize``: float ONNX + calibration data → QDQ ONNX, with a summary."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import click

from edgequant.cli.paths import OutputPath
from edgequant.errors import ConfigError, OutputError, not_a_file, parse_guarded, read_text
from edgequant.planning.overrides import Override

EXAMPLES = """
\b
Examples:
  edgequant quantize model.onnx -o model.q.onnx --calib calib_npz/
  edgequant quantize model.onnx -o out.onnx --calib images/ --mean 123.7,116.3,103.5 --std 58.4,57.1,57.4
  edgequant quantize model.onnx -o out.onnx --calib a_list.txt --calib b_list.txt   # two inputs
  edgequant quantize model.onnx -o out.onnx --calib data/ --method percentile --percentile 99.9
  edgequant quantize -c config.json -i model.onnx -o out.onnx
  python -m edgequant -c config.json
"""


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_output(path: Path, model: Path | None) -> None:
    """Fail before any work if the output cannot be written or would overwrite the input."""
    if model is not None and path.resolve() == Path(model).resolve():
        raise OutputError(f"output {path} is the input model; choose another -o (the input is never modified)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}; create it or choose another -o")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write {path}: permission denied; choose another -o")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name with -o")
    size, limit = len(os.fsencode(path.name)), _name_max(folder)
    if size > limit:
        raise OutputError(f"output file name is {size} bytes long and this file system allows {limit}; choose a "
                          "shorter -o")


def check_side_outputs(exports: list[tuple[str, Path]], report_dir: Path | None, model: Path | None) -> None:
    """Fail before any work if a parameter file or the report folder cannot be written:
    nothing is written when one of the outputs would fail at the end."""
    for fmt, path in exports:
        if path.is_dir():
            raise OutputError(f"--export-params {fmt}:{path} is a folder; give a file name")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise OutputError(f"--export-params {fmt}:{path}: folder {folder} does not exist; create it or choose "
                              "another path")
        if model is not None and path.resolve() == Path(model).resolve():
            raise OutputError(f"--export-params {fmt}:{path} is the input model; choose another path")
    if report_dir is not None:
        parent = report_dir.parent if str(report_dir.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"--report-dir {report_dir}: folder {parent} does not exist; create it or choose another")
        if report_dir.exists() and not report_dir.is_dir():
            raise OutputError(f"--report-dir {report_dir} exists and is not a folder; choose another")


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("-i", "--input", "model_opt", type=click.Path(path_type=Path), help="Model path (same as MODEL).")
@click.option("-o", "--output", type=OutputPath(), help="Output model [default: MODEL stem + .q.onnx].")
@click.option("--calib", multiple=True, help="Calibration data: folder (npz/npy/images/raw), list file or file; once per input.")
@click.option("-c", "--config", type=click.Path(path_type=Path), help="Config file (JSON/YAML, XQuant layout).")
@click.option("--target", help="Target profile: dtypes, symmetry, granularity, power-of-two scales, rounding (edgequant targets).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse", "search"]), help="Activation range method; search: per tensor, the least-error of the other four [default: percentile].")
@click.option("--percentile", type=float, help="Percentile for --method percentile [default: 99.99].")
@click.option("--per-channel/--per-tensor", default=None, help="Weight granularity [default: per-channel].")
@click.option("--activation-dtype", type=click.Choice(["uint8", "int8", "uint16", "int16"]), help="[default: uint8]")
@click.option("--weight-dtype", type=click.Choice(["int8", "uint8", "int4", "uint4"]), help="[default: int8; int4/uint4: W4A8, W4A16 at opset 21]")
@click.option("--weight-clipping-ratio", type=float, metavar="R", help="Keep R (0-1] of each weight channel's min/max range instead of searching the MSE-best share (NeuroPilot weights_quantization_clipping_ratio).")
@click.option("--symmetric", type=click.Choice(["weights", "activations", "both", "none"]), help="Symmetric ranges for [default: weights].")
@click.option("--batch-size", type=int, help="Samples per inference batch [default: 1].")
@click.option("--num-samples", type=int, help="Calibration samples to use [default: 100].")
@click.option("--eval-samples", type=int, help="Held-out samples for the fidelity check [default: 16].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Calibration device [default: auto].")
@click.option("--file-type", type=click.Choice(["img", "npy", "npz", "raw"]), help="Calibration file type [default: detected].")
@click.option("--mean", help="Image mean per channel, e.g. 123.7,116.3,103.5.")
@click.option("--std", help="Image std per channel, e.g. 58.4,57.1,57.4.")
@click.option("--color-format", type=click.Choice(["rgb", "bgr", "gray"]), help="Image channel order [default: rgb].")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="What the input dimensions mean: the image layout [default: from the input shape]; for a PyTorch MODEL also the layout it is exported in (NHWC: channels-last in and out) [default: NCHW].")
@click.option("--preprocess", help="User function 'file.py:function' turning a batch of paths into an array.")
@click.option("--override", "overrides", multiple=True, metavar="SELECTOR=PRECISION",
              help="Keep layers in 16-bit or float: node name, glob, re:REGEX or op:TYPE = int8|uint8|int16|uint16|float. Repeatable.")
@click.option("--float-after", multiple=True, metavar="TENSOR", help="Keep the layer producing TENSOR and everything after it in float. Repeatable.")
@click.option("--float-before", multiple=True, metavar="TENSOR", help="Keep the layer producing TENSOR and everything before it in float. Repeatable.")
@click.option("--precision-level", type=click.IntRange(0, 4), help="0 int8, 1 int8 + 16-bit sensitive ops, 2 16-bit activations, 3 16-bit activations and weights, 4 float.")
@click.option("--override-file", type=click.Path(path_type=Path), help="YAML/JSON with quantization_parameters.overrides (as --auto-mixed writes).")
@click.option("--auto-mixed", is_flag=True, help="Find the fewest, cheapest layers to keep in --fallback precision until the output fidelity reaches the target.")
@click.option("--target-cosine", type=float, help="--auto-mixed target: worst output cosine on the worst sample [default: 0.99].")
@click.option("--target-sqnr", type=float, help="--auto-mixed target in dB instead of cosine.")
@click.option("--max-high-precision", default="10%", show_default=True, help="--auto-mixed budget: share of MACs allowed in higher precision (10% or 0.1).")
@click.option("--fallback", type=click.Choice(["int16", "uint16", "float"]), default="int16", show_default=True, help="--auto-mixed precision for the layers it picks.")
@click.option("--recover", is_flag=True, default=None, help="--auto-mixed: first fix the rounding with bias correction (+ CLE for per-tensor weights, GPTQ for 4-bit ones), then search [default: when the target cannot run float].")
@click.option("--protect-statistics", is_flag=True, help="Keep the statistics of decomposed normalisations (mean, x - mean, its square, + eps) in the target's repair fallback (float on generic, int16 on NPUs) from the start, instead of leaving a collapse to the repair.")
@click.option("--no-repair", is_flag=True, help="Write the plain result even when the collapse guard finds it broken (default: repair it first with recovery algorithms or minmax ranges, then mixed precision).")
@click.option("--json", "json", is_flag=True, help="Also write the summary as JSON beside the model (OUT stem + .summary.json): ops, precision, fidelity per output, recovery steps, notes.")
@click.option("--strict", is_flag=True, help="Exit with status 3 when the written model is still broken (the collapse guard fires after any repair).")
@click.option("--export-params", multiple=True, metavar="FORMAT:PATH", help="Write parameters: qparams (NeuroPilot JSON), cali-table, qtable (TPU-MLIR), acuity (YAML), edgequant (own JSON), espdl (the ESP-DL model file, via esp-ppq). Repeatable.")
@click.option("--import-params", multiple=True, metavar="FORMAT:PATH", help="Read parameters (same formats) as overrides; edgequant:PATH re-creates the model without calibration. Repeatable.")
@click.option("--analyze", is_flag=True, help="Also write a per-layer error report (see edgequant analyze).")
@click.option("--report-dir", type=click.Path(path_type=Path), help="Report folder for --analyze [default: OUTPUT stem + _report].")
@click.option("--no-simplify", is_flag=True, help="Skip constant folding and BatchNorm folding.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS", help="Fix an input's shape, e.g. input=1x512: shape-derived values fold to constants and If/Loop tests on them fold away; a PyTorch MODEL (.pt TorchScript, .pt2) is exported at these shapes, its inputs named after them. Repeatable.")
@click.option("--fix-input", "fixed_inputs", multiple=True, metavar="NAME=VALUE", help="Pin an input to a value, e.g. sr=16000: the graph is specialized to it (the input stays, unused). Repeatable.")
@click.option("--no-specialize", is_flag=True, help="Keep control flow as it is [default: a model with If/Loop/Scan is specialized at the shapes, and constant integer scalars, of its calibration data].")
@click.option("--quantize-narrow-convs", is_flag=True, help="Quantize the Convs that read fewer than 8 input channels (an image stem) too [default on the generic target: they stay float, as onnxruntime runs them faster in float than in int8].")
@click.option("--float-bodies", is_flag=True, help="Leave the If branches and Loop/Scan bodies that stay float [default: each is quantized as a model of its own, on the calibration samples that take it or on its iterations].")
@click.option("--cle", is_flag=True, default=None, help="Cross-layer equalization of consecutive Conv/Gemm pairs before calibration (ReLU6 between them becomes Relu).")
@click.option("--bias-correction", type=click.Choice(["empirical", "fast"]), is_flag=False, flag_value="empirical", help="Remove each layer's mean output error from its bias: empirical (measured layer by layer) or fast (weight rounding on input means) [flag alone: empirical].")
@click.option("--adaround", is_flag=True, default=None, help="Learn each weight's rounding layer by layer (AdaRound; needs pip install 'edgequant[torch]').")
@click.option("--gptq", is_flag=True, default=None, help="Hessian-based weight rounding layer by layer (GPTQ-style, numpy).")
@click.option("--smoothquant", type=str, is_flag=False, flag_value="0.5", metavar="[ALPHA|auto]", help="Move activation outliers of MatMul/Gemm inputs into the weights (SmoothQuant) [flag alone: alpha 0.5; auto: alpha chosen per activation].")
@click.option("--finetune-level", type=click.IntRange(0), help="XQuant finetune_level: 0 none, 1 GPTQ rounding and bias correction, 2 GPTQ, then block reconstruction from its rounding, and bias correction (PyTorch).")
@click.option("--workers", type=click.IntRange(1), help="Local worker processes for calibration shards, layer trials and --auto-mixed candidates (same output bytes) [default: 1].")
@click.option("--ray", "ray_address", metavar="ADDRESS", help="Run those work units on a Ray cluster (host:port or ray://host:port; pip install 'edgequant[ray]').")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def quantize(**flags: Any) -> None:
    """Quantize a float ONNX MODEL (or a PyTorch .pt/.pt2 file, exported first at the
    --input-shape shapes) with calibration data into a QDQ ONNX model.

    When the result is broken (outputs, or their decisions, far from float on held-out
    samples), it is repaired before it is written: recovery algorithms where weight rounding
    is to blame, else unclipped (minmax) activation ranges, then mixed precision within 10 %
    of MACs; the summary says what changed
    (--no-repair writes the plain result). A model with If/Loop is first specialized at its
    calibration data's shapes, and the Ifs those decide are folded away (--no-specialize
    keeps them); the If branches and Loop/Scan bodies that stay are quantized too (--float-bodies keeps
    them float).
    """
    from edgequant.api import quantize as run
    from edgequant.cli.render import print_collapse, print_summary, progress_bar
    from edgequant.config.schema import load_config
    from edgequant.export import check_exportable, parse_spec
    from edgequant.export import export_params as write_params
    from edgequant.mixed.search import auto_mixed
    from edgequant.planning.options import parse_options

    f = flags
    if f["model"] and f["model_opt"] and f["model"] != f["model_opt"]:
        raise ConfigError("give the model once: as MODEL or with -i, not both")
    cfg = load_config(f["config"]) if f["config"] else None
    model_path = f["model"] or f["model_opt"] or (cfg.model_path if cfg else None)
    if model_path is None:
        raise ConfigError("no model given: edgequant quantize MODEL -o OUT --calib DATA (or -c CONFIG)")
    out = f["output"] or (cfg.output_path if cfg and cfg.output_path and not (f["model"] or f["model_opt"]) else None)
    out = Path(out) if out else Path(model_path).with_suffix(".q.onnx")
    check_output(out, Path(model_path))
    if f["json"] and summary_path(out).is_dir():
        raise OutputError(f"--json: {summary_path(out)} is a folder; choose another -o")
    exports = [parse_spec(e) for e in f["export_params"]]
    imports = [parse_spec(i) for i in f["import_params"]]
    model_arg = torch_export(model_path, f["input_shapes"], f["layout"], cfg)
    check_side_outputs(exports, f["report_dir"] if (f["analyze"] or (cfg is not None and cfg.analyze)) else None,
                       Path(model_path))
    if any(fmt == "edgequant" for fmt, _ in imports):
        _recreate(model_path, imports, exports, out, f["quiet"], f["json"])
        return
    changes = option_changes(f, cfg, imports)
    planned = parse_options(cfg.options if cfg else None, changes)
    for fmt, _ in exports:  # before any work: nothing half-done
        check_exportable(fmt, planned.recovery, planned.target)
    settings = image_settings(model_arg, cfg, {
        "file_type": f["file_type"], "mean": _floats(f["mean"]), "std": _floats(f["std"]),
        "color_format": f["color_format"], "layout": f["layout"], "preprocess": f["preprocess"]})
    calib = list(f["calib"]) if f["calib"] else None
    mixed = None
    logging.getLogger("edgequant.pipeline").setLevel(logging.ERROR)  # the collapse warning is rendered below
    with progress_bar(not f["quiet"]) as progress:
        if f["auto_mixed"]:
            result, mixed = auto_mixed(model_arg, calib, config=cfg, input_settings=settings, progress=progress,
                                       target_cosine=f["target_cosine"], target_sqnr=f["target_sqnr"],
                                       max_high_precision=_share(f["max_high_precision"]), fallback=f["fallback"],
                                       recover=f["recover"], **changes)
        else:
            result = run(model_arg, calib, config=cfg, input_settings=settings, progress=progress,
                         exports=tuple(fmt for fmt, _ in exports), **changes)
    saved = result.save(out)
    written = [str(saved)] + [str(write_params(result, fmt, path)) for fmt, path in exports]
    if mixed is not None:
        written += [str(p) for p in mixed.write(out.with_suffix(""))]
    if f["json"]:
        written.append(str(write_summary(result, out)))
    if not f["quiet"]:
        print_summary(result.summary, ", ".join(written))
    if result.summary.collapse is not None:
        print_collapse(result.summary.collapse)
    if f["analyze"] or (cfg is not None and cfg.analyze):
        _analyze(result, f["calib"], cfg, settings, f["report_dir"] or out.with_name(out.stem + "_report"), f["quiet"])
    if f["strict"] and result.summary.collapse is not None:
        raise SystemExit(3)


#: CLI flags that set a QuantOptions field of the same meaning (flag name → field).
OPTION_FLAGS = {"target": "target", "method": "method", "percentile": "percentile", "per_channel": "per_channel",
                "activation_dtype": "activation_dtype", "weight_dtype": "weight_dtype", "batch_size": "batch_size",
                "num_samples": "num_samples", "eval_samples": "eval_samples", "device": "device",
                "workers": "workers", "ray_address": "ray_address", "weight_clipping_ratio": "weight_clipping_ratio", "cle": "cle", "bias_correction": "bias_correction",
                "adaround": "adaround", "gptq": "gptq", "smoothquant": "smoothquant", "finetune_level": "finetune_level"}


def option_changes(f: dict[str, Any], cfg, imports) -> dict[str, Any]:
    """The QuantOptions fields the flags set (only those given), overrides included."""
    from edgequant.export import import_params as read_params

    changes = {field: f[flag] for flag, field in OPTION_FLAGS.items() if f[flag] is not None}
    if f["symmetric"]:
        changes["weight_symmetric"] = f["symmetric"] in ("weights", "both")
        changes["activation_symmetric"] = f["symmetric"] in ("activations", "both")
    if f["no_simplify"]:
        changes["simplify"] = False
    if f["no_repair"]:
        changes["repair"] = False
    if f["protect_statistics"]:
        changes["protect_statistics"] = True
    if f["no_specialize"]:
        changes["specialize"] = False
    if f["float_bodies"]:
        changes["quantize_bodies"] = False
    if f["quantize_narrow_convs"]:
        changes["float_narrow_convs"] = 0
    if f["input_shapes"]:
        changes["input_shapes"] = list(f["input_shapes"])
    if f["fixed_inputs"]:
        changes["fixed_inputs"] = list(f["fixed_inputs"])
    extra = cli_overrides(f["overrides"], f["float_after"], f["float_before"], f["precision_level"])
    if f["override_file"]:
        extra = read_override_file(f["override_file"]) + extra
    for fmt, path in imports:
        extra = read_params(fmt, path) + extra
    if extra:
        changes["overrides"] = (cfg.options.overrides if cfg else ()) + extra
    return changes


def _recreate(model_path, imports, exports, out: Path, quiet: bool, as_json: bool = False) -> None:
    from edgequant.cli.render import print_summary
    from edgequant.export import export_params as write_params
    from edgequant.export.native import recreate

    if len(imports) != 1:
        raise ConfigError("--import-params edgequant:PATH describes the whole model: give it alone")
    result = recreate(model_path, imports[0][1])
    saved = result.save(out)
    written = [str(saved)] + [str(write_params(result, fmt, path)) for fmt, path in exports]
    if as_json:
        written.append(str(write_summary(result, out)))
    if not quiet:
        print_summary(result.summary, ", ".join(written))


def summary_path(out: Path) -> Path:
    """Where ``--json`` writes the summary: beside the model, ``m.q.onnx`` → ``m.q.summary.json``."""
    return out.with_name(out.stem + ".summary.json")


def write_summary(result, out: Path) -> Path:
    import json

    from edgequant.ir.model import write_atomic

    text = json.dumps({"model": str(out), **result.summary.to_dict()}, indent=1, allow_nan=False)
    return write_atomic(summary_path(out), (text + "\n").encode())


def _share(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise ConfigError(f"--max-high-precision {text!r} must be a share of MACs like 10% or 0.1") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"--max-high-precision {text!r} must be between 0 and 100%")
    return value


def read_override_file(path: Path) -> tuple[Override, ...]:
    """Overrides from a YAML/JSON file: ``quantization_parameters.overrides`` or ``overrides``."""
    import yaml

    if not path.is_file():
        raise ConfigError(not_a_file("override", path))
    try:
        text = read_text(path, "override")
        data = parse_guarded(lambda: yaml.safe_load(text), path, "override") or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"override file {path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    items = data.get("quantization_parameters", data).get("overrides") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"override file {path} has no overrides list (quantization_parameters.overrides)")
    return tuple(Override.parse(str(o)) for o in items)


def cli_overrides(overrides, float_after, float_before, precision_level) -> tuple[Override, ...]:
    """The CLI's mixed-precision flags as overrides: level first, then regions, then --override."""
    from edgequant.planning.overrides import FLOAT
    from edgequant.planning.selectors import After, Before

    out = [Override("re:.*", level=precision_level)] if precision_level is not None else []
    out += [Override(After((t,), inclusive=True, what="--float-after"), FLOAT) for t in float_after]
    out += [Override(Before(t), FLOAT) for t in float_before]
    return tuple(out) + tuple(Override.parse(o) for o in overrides)


def _analyze(result, calib, cfg, settings, folder: Path, quiet: bool) -> None:
    from edgequant.analysis.analyze import analyze
    from edgequant.analysis.report import write_report
    from edgequant.cli.render import print_report, progress_bar

    data = list(calib) if calib else None  # None: the config's data_list_path entries
    if settings is None and cfg is not None and cfg.settings:
        settings = list(cfg.settings)
    with progress_bar(not quiet) as progress:
        report = analyze(result.float_model, result.model, data, input_settings=settings, progress=progress)
    folder = write_report(report, folder)
    if not quiet:
        print_report(report, folder, 5)


def torch_export(model_path, shapes: tuple[str, ...], layout: str | None, cfg=None):
    """The model path as it is, or a PyTorch file (TorchScript, ``.pt2``) exported to ONNX at the
    ``--input-shape`` shapes (else the config's ``input_name``/``input_shape``) in ``--layout``."""
    from edgequant.api import onnx_model
    from edgequant.frontends.torch import is_torch_model

    if not is_torch_model(model_path):
        return model_path
    if not shapes and not (cfg is not None and cfg.settings and all(st.shape for st in cfg.settings)):
        raise ConfigError(f"{model_path} is a PyTorch model: give its input shapes with --input-shape NAME=DIMS "
                          "(in the layout --layout names, NCHW unless given), e.g. --input-shape input=1x3x224x224")
    return onnx_model(model_path, None, layout, changes={"input_shapes": list(shapes)} if shapes else None, cfg=cfg)


def image_settings(model_path, cfg, image: dict):
    """Per-input settings with the image flags applied (None when no flag is given)."""
    from edgequant.data.inputs import InputSettings, model_inputs
    from edgequant.ir.model import load_model

    image = {k: v for k, v in image.items() if v is not None}
    if not image:
        return None
    base = list(cfg.settings) if cfg and cfg.settings else None
    if base is None:
        base = [InputSettings() for _ in model_inputs(load_model(model_path))]
    return [dataclasses.replace(st, **image) for st in base]
