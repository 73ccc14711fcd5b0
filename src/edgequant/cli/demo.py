"""``edgequant demo``: quantize the bundled MNIST CNN and compare float with int8."""

from __future__ import annotations

from pathlib import Path

import click

from edgequant.cli.paths import OutputPath


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output-dir", type=OutputPath(file=False), default=Path("edgequant-demo"),
              show_default=True, help="Folder for the quantized model.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def demo(output_dir: Path, quiet: bool) -> None:
    """Quantize a small CNN trained on real MNIST digits (bundled) and report accuracy."""
    from rich.table import Table

    from edgequant.cli.render import out, print_summary, progress_bar
    from edgequant.demo import next_commands, run_demo

    with progress_bar(not quiet) as progress:
        rep = run_demo(output_dir, progress)
    out.print("[bold]edgequant demo[/bold]: MNIST CNN (1000 held-out real digits, 300 calibration)")
    t = Table("", "float32", "int8 (QDQ)")
    t.add_row("top-1 accuracy", f"{rep.float_accuracy:.2%}", f"{rep.int8_accuracy:.2%}")
    t.add_row("model size", f"{rep.float_bytes / 1024:.0f} KiB", f"{rep.int8_bytes / 1024:.0f} KiB")
    t.add_row("latency (1 thread, batch 1)", f"{rep.float_ms:.3f} ms", f"{rep.int8_ms:.3f} ms")
    out.print(t)
    out.print(f"logits cosine float vs int8: {rep.output_cosine:.5f}   quantization took {rep.quantize_seconds:.1f} s")
    print_summary(rep.result.summary, str(rep.output))
    out.print(f"\n[bold]Next[/bold] (the float model, calibration digits and test digits are in {output_dir}/):")
    for line in next_commands(output_dir):
        out.print(f"  {line}", soft_wrap=True)
