"""``edgequant analyze``: per-layer error report of a quantized model against its float model."""

from __future__ import annotations

from pathlib import Path

import click
from onnx import ModelProto

from edgequant.cli.paths import OutputPath

EXAMPLES = """
\b
Examples:
  edgequant analyze model.onnx model.q.onnx --calib calib_npz/ -o report/
  edgequant analyze model.onnx model.q.onnx --calib images/ --mean 123.7,116.3,103.5 --mode layerwise
  edgequant analyze model.onnx model.q.onnx -c config.json      the config's data and preprocessing
  edgequant analyze net.pt net.q.onnx --calib calib/ --input-shape image=1x3x224x224
"""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("float_model", type=click.Path(path_type=Path))
@click.argument("quant_model", type=click.Path(path_type=Path))
@click.option("--calib", multiple=True, help="Samples: folder (npz/npy/images/raw), list file or file; once per input [default: the config's data_list_path].")
@click.option("-c", "--config", type=click.Path(path_type=Path), help="Config file (JSON/YAML, XQuant layout): its inputs' data, preprocess function, mean/std and color format.")
@click.option("-o", "--output", "output", type=OutputPath(file=False), default=Path("edgequant-report"),
              show_default=True, help="Report folder (report.md, report.html, report.json, PNG plots).")
@click.option("--mode", type=click.Choice(["graphwise", "layerwise", "both"]), default="both", show_default=True,
              help="graphwise: the quantized model end to end; layerwise: one layer quantized at a time.")
@click.option("--num-samples", type=int, default=32, show_default=True, help="Samples to analyse.")
@click.option("--top", type=int, default=5, show_default=True, help="Layers to put in the suggested fix.")
@click.option("--mean", help="Image mean per channel, e.g. 123.7,116.3,103.5.")
@click.option("--std", help="Image std per channel.")
@click.option("--color-format", type=click.Choice(["rgb", "bgr", "gray"]), help="Image channel order.")
@click.option("--file-type", type=click.Choice(["img", "npy", "npz", "raw"]), help="Sample file type [default: detected].")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Image layout [default: from the input shape]; a PyTorch FLOAT_MODEL is exported in it.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS", help="A PyTorch FLOAT_MODEL (.pt TorchScript, .pt2) is exported at these shapes, as quantize exported it. Repeatable.")
@click.option("--preprocess", help="User function 'file.py:function' turning a batch of paths into an array.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def analyze(float_model, quant_model, calib, config, output, mode, num_samples, top, mean, std, color_format,
            file_type, layout, input_shapes, preprocess, quiet, debug) -> None:
    """Show where QUANT_MODEL (QDQ) loses accuracy against FLOAT_MODEL (ONNX, or the PyTorch
    .pt/.pt2 file it was quantized from, with --input-shape), layer by layer."""
    from edgequant.analysis.analyze import analyze as run
    from edgequant.analysis.report import write_report
    from edgequant.cli.quantize import _floats, image_settings, torch_export
    from edgequant.cli.render import print_report, progress_bar
    from edgequant.config.schema import load_config

    cfg = load_config(config) if config else None
    float_arg = torch_export(float_model, input_shapes, layout, cfg)
    float_arg = float_arg if isinstance(float_arg, ModelProto) else str(float_arg)
    settings = image_settings(float_arg, cfg, {"mean": _floats(mean), "std": _floats(std),
                                                 "color_format": color_format, "file_type": file_type,
                                                 "layout": layout, "preprocess": preprocess})
    if settings is None and cfg is not None and cfg.settings:
        settings = list(cfg.settings)
    with progress_bar(not quiet) as progress:
        report = run(float_arg, str(quant_model), list(calib) or None, mode=mode, num_samples=num_samples,
                     input_settings=settings, progress=progress)
    folder = write_report(report, output, top=top)
    if not quiet:
        print_report(report, folder, top)
