"""Terminal rendering of progress and summaries (rich), on stderr / stdout."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from edgequant.api import Summary

out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """Yield a ``progress(stage, done, total)`` callback drawing one bar per stage."""
    if not enabled:
        yield None
        return
    bar = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, TaskID] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    with bar:
        yield update


def _fmt_ops(ops: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def print_summary(summary: Summary, output: str | None) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    nq, nf = sum(summary.quantized_ops.values()), sum(summary.float_ops.values())
    t.add_row("quantized ops", f"{nq}: {_fmt_ops(summary.quantized_ops)}")
    t.add_row("left float", f"{nf}: {_fmt_ops(summary.float_ops)}")
    if summary.subgraph_float_ops:
        t.add_row("", f"{summary.subgraph_float_ops} ops inside If/Loop/Scan bodies were left float")
    t.add_row("calibration", f"{summary.calibration_samples} samples in {summary.calibration_seconds:.1f} s")
    where = "calibration samples (too few to hold some out)" if summary.eval_on_calibration else "held-out samples"
    for f in summary.fidelity:
        t.add_row(f"output {f.name}", f"cosine {f.cosine:.5f}   SQNR {f.sqnr_db:.1f} dB   "
                                      f"({summary.eval_samples} {where})")
    if summary.opset[0] != summary.opset[1]:
        t.add_row("opset", f"upgraded {summary.opset[0]} → {summary.opset[1]}")
    for note in summary.notes:
        t.add_row("note", note)
    t.add_row("total time", f"{summary.total_seconds:.1f} s")
    if output:
        t.add_row("written", output)
    out.print(t)
