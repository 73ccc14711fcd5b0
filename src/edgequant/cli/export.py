"""``edgequant export``: a PyTorch model file (TorchScript ``.pt``, ``torch.export`` ``.pt2``) →
float ONNX, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgequant.cli.paths import OutputPath

EXAMPLES = """\b
Examples:
  edgequant export model.pt -o model.onnx --input-shape input=1x3x224x224
  edgequant export model.pt -o model.onnx --input-shape image=1x224x224x3 --layout NHWC
  edgequant export model.pt2 -o model.onnx --input-shape x=1x80x3000 --dynamic-batch
"""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=OutputPath(), help="ONNX model to write [default: MODEL stem + .onnx].")
@click.option("--input-shape", "input_shapes", multiple=True, required=True, metavar="NAME=DIMS",
              help="Name and shape of each input, in forward's order and in --layout, e.g. input=1x3x224x224. Repeatable.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True,
              help="What the dimensions mean; NHWC: the ONNX model takes and returns channels-last 4-D tensors.")
@click.option("--dynamic-batch", is_flag=True, help="Axis 0 of every input and output symbolic (N).")
@click.option("--opset", type=click.IntRange(11, 23), help="ai.onnx opset [default: 17].")
@click.option("-q", "--quiet", is_flag=True, help="No summary line.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def export(**f: Any) -> None:
    """Export a PyTorch MODEL (TorchScript or torch.export file) to float ONNX.

    The export is run in onnxruntime on seeded random inputs of the given shapes and compared
    with PyTorch output by output; a difference is an error naming the output.
    """
    from edgequant.cli.quantize import check_output
    from edgequant.frontends.torch import from_torch
    from edgequant.ir.model import save_model

    model = Path(f["model"])
    out = Path(f["output"]) if f["output"] else model.with_suffix(".onnx")
    check_output(out, model)
    proto = from_torch(model, input_shapes=list(f["input_shapes"]), layout=f["layout"],
                       dynamic_batch=f["dynamic_batch"], opset=f["opset"])
    saved = save_model(proto, out)
    if not f["quiet"]:
        ins = ", ".join(f"{i.name} {'x'.join(str(d.dim_value or d.dim_param) for d in i.type.tensor_type.shape.dim)}"
                        for i in proto.graph.input)
        click.echo(f"{saved}: {len(proto.graph.node)} ops, inputs {ins}; matches PyTorch on the example inputs")
