"""``edgequant run``: run a float or quantized model on inputs and save its tensors (.npz)."""

from __future__ import annotations

from pathlib import Path

import click

from edgequant.cli.paths import OutputPath

EXAMPLES = """
\b
Examples:
  edgequant run model.onnx --inputs x.npz -o float_out.npz
  edgequant run model.q.onnx --inputs x.npz --dump-all -o quant_all.npz
  edgequant compare float_all.npz quant_all.npz --tolerance 0.99,0.90
"""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--inputs", required=True, type=click.Path(path_type=Path),
              help=".npz with one array per model input (by input name), or one .npy for a single input.")
@click.option("-o", "--output", required=True, type=OutputPath(), help="Output .npz.")
@click.option("--dump-all", is_flag=True, help="Save every intermediate tensor, not only the outputs.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def run(model, inputs, output, dump_all, quiet, debug) -> None:
    """Run MODEL on --inputs with onnxruntime and save the outputs (golden tensors)."""
    from edgequant.cli.quantize import check_output
    from edgequant.data.npz import load_npz, save_npz
    from edgequant.ir.model import load_model
    from edgequant.runtime.dump import match_inputs, run_model

    check_output(output, model)
    m = load_model(model)
    tensors = run_model(m, match_inputs(m, load_npz(inputs)), dump_all=dump_all)
    save_npz(output, tensors)
    if not quiet:
        click.echo(f"{len(tensors)} tensors written to {output}")
