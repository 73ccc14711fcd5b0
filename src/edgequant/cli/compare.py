"""``edgequant compare``: per-tensor similarity of two .npz dumps; exit 1 below tolerance."""

from __future__ import annotations

import sys
from pathlib import Path

import click

EXAMPLES = """
\b
Exit status: 0 every common tensor within tolerance, 1 some tensor below it, 2 bad input.
Examples:
  edgequant compare float_all.npz quant_all.npz
  edgequant compare float_all.npz int8_all.npz --preset int8
  edgequant compare a.npz b.npz --tolerance 0.98,0.80 --except 'logits,*/Shape*'
"""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--tolerance", default=None,
              help="Minimum COSINE,EUCLIDEAN similarity for a tensor to pass [default: the preset's].")
@click.option("--preset", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="Tolerance for what is compared: float (0.99,0.90: float against float), int8 (0.85,0.45: "
                   "float against an int8 model, as TPU-MLIR users compare).")
@click.option("--except", "excepts", default="", help="Comma-separated tensor names (or globs) to skip.")
@click.option("-v", "--verbose", is_flag=True, help="List passing tensors too.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def compare(a, b, tolerance, preset, excepts, verbose, debug) -> None:
    """Compare the tensors of two .npz dumps that share a name (cosine, Euclidean, SQNR)."""
    from edgequant.analysis.compare import PRESETS, compare_dumps, parse_tolerance
    from edgequant.cli.render import print_comparison
    from edgequant.data.npz import load_npz
    from edgequant.errors import CalibrationDataError

    tol = parse_tolerance(tolerance) if tolerance else PRESETS[preset]
    da, db = load_npz(a), load_npz(b)
    result = compare_dumps(da, db, tol, excepts.split(","))
    if not result.rows:
        raise CalibrationDataError(f"{a} and {b} have no tensor name in common "
                                   f"({len(result.only_a)} and {len(result.only_b)} names)")
    print_comparison(result, tol, verbose)
    if not result.passed:
        sys.exit(1)
