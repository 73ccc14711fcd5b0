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
    TimeRemainingColumn,
)
from rich.table import Table

from edgequant.api import Summary


class _Console(Console):
    """A console that, writing to a pipe or file, leaves no trailing blanks: rich pads every
    table row to the table's width, which a terminal hides and ``grep``/``diff`` do not."""

    def print(self, *objects, **kwargs) -> None:  # type: ignore[override]
        if self.is_terminal:
            super().print(*objects, **kwargs)
            return
        with self.capture() as captured:
            super().print(*objects, **kwargs)
        self.file.write("\n".join(line.rstrip() for line in captured.get().split("\n")))
        self.file.flush()


out = _Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = _Console(stderr=True, highlight=False)


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """Yield a ``progress(stage, done, total)`` callback drawing one bar per stage; a stage
    ``"name · note"`` is the bar of ``name``, showing the note (e.g. a loss going down)."""
    if not enabled:
        yield None
        return
    bar = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
    tasks: dict[str, TaskID] = {}

    def update(stage: str, done: int, total: int) -> None:
        key = stage.split(" · ")[0]
        if key not in tasks:
            tasks[key] = bar.add_task(stage, total=total)
        bar.update(tasks[key], completed=done, total=total, description=stage)

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
    if summary.precision:
        from collections import Counter

        kinds = Counter(summary.precision.values())
        t.add_row("overrides", f"{len(summary.precision)} layers: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    if summary.eight_bit_macs and summary.eight_bit_macs[1]:
        eight, total = summary.eight_bit_macs
        t.add_row("8-bit MACs", f"{eight / total:.1%} of {total:,} (Conv/Gemm/MatMul/LSTM with 8-bit weights and "
                                "8-bit activations)")
    t.add_row("calibration", f"{summary.calibration_samples} samples in {summary.calibration_seconds:.1f} s")
    where = "calibration samples (too few to hold some out)" if summary.eval_on_calibration else "held-out samples"
    for f in summary.fidelity:
        kept = f"   decisions kept {f.decisions:.0%}" if f.decisions is not None else ""
        kept += f"   decoded as float {f.sequences:.0%}" if f.sequences is not None else ""
        kept += f"   confident scores flipped {f.flipped} (1 − F1 {f.flips:.3f})" if f.flips is not None else ""
        t.add_row(f"output {f.name}", f"cosine {f.cosine:.5f}   SQNR {f.sqnr_db:.1f} dB{kept}   "
                                      f"({summary.eval_samples} {where})")
    for step in summary.recovery:
        t.add_row("recovery", step.line())
    for line in summary.repair:
        t.add_row("repair", line)
    if summary.opset[0] != summary.opset[1]:
        t.add_row("opset", f"upgraded {summary.opset[0]} → {summary.opset[1]}")
    for note in summary.notes:
        t.add_row("note", note)
    t.add_row("total time", f"{summary.total_seconds:.1f} s")
    if output:
        t.add_row("written", output)
    out.print(t)


def _f(x: float, spec: str = ".4f") -> str:
    from edgequant.analysis.report import _fmt

    return {"∞": "inf", "−∞": "-inf"}.get(_fmt(x, spec), _fmt(x, spec))


def print_report(report, folder, top: int) -> None:
    """The worst layers, the suggested fix and where the report went."""
    from edgequant.analysis.report import fix_lines

    for o in report.outputs:
        out.print(f"output {o.name}: cosine {_f(o.metrics.cosine, '.5f')}   SQNR {_f(o.metrics.sqnr_db, '.1f')} dB")
    if report.layerwise:
        t = Table("layer (quantized alone)", "op", "output cosine", "output noise/signal", "inf/NaN",
                  title="worst layers")
        for r in report.worst_layers(top):
            t.add_row(r.node, r.op_type, _f(r.output.cosine), _f(r.output.snr),
                      str(r.output.nonfinite + r.local.nonfinite or ""))
        out.print(t)
    elif report.graphwise:
        t = Table("tensor", "op", "noise/signal", "cosine", title="worst tensors (cumulative)")
        for g in report.worst_tensors(top):
            t.add_row(g.name, g.op_type, _f(g.metrics.snr), _f(g.metrics.cosine))
        out.print(t)
    fixes = [str(o) for o in report.fixes(top)]
    if fixes:
        out.print("suggested fix: " + fix_lines(fixes)[0], soft_wrap=True)
    for note in report.notes:
        out.print(f"note: {note}")
    out.print(f"report written to {folder}/ (report.html, report.md, report.json)")


def print_comparison(result, tolerance: tuple[float, float], verbose: bool) -> None:
    t = Table("tensor", "shape", "cosine", "euclidean", "SQNR dB", "result")
    for r in result.rows:
        if r.passed and not verbose:
            continue
        m = r.metrics
        status = r.status + (f" ({m.nonfinite} NaN/inf)" if m and m.nonfinite else "")
        if m is not None and m.nonfinite:  # figures of the finite part alone would look healthy
            m = None
        t.add_row(r.name, str(list(r.shape)), _f(m.cosine) if m else "", _f(m.euclidean) if m else "",
                  _f(m.sqnr_db, ".1f") if m else "", ("PASSED " if r.passed else "FAILED ") + status)
    if t.row_count:
        out.print(t)
    failed = sum(not r.passed for r in result.rows)
    out.print(f"{len(result.rows)} compared, {len(result.rows) - failed} passed, {failed} failed "
              f"(tolerance cosine {tolerance[0]}, euclidean {tolerance[1]})")
    if result.only_a:
        out.print(f"only in the first file ({len(result.only_a)}): {', '.join(result.only_a[:20])}"
                  + (" ..." if len(result.only_a) > 20 else ""))
    if result.only_b:
        out.print(f"only in the second file ({len(result.only_b)}): {', '.join(result.only_b[:20])}"
                  + (" ..." if len(result.only_b) > 20 else ""))
    if result.skipped:
        out.print(f"skipped (--except): {len(result.skipped)}")


def print_collapse(collapse) -> None:
    """The collapse guard's warning: loud, on stderr, even with --quiet."""
    err.print(f"[bold red]WARNING: the quantized model's outputs collapsed[/bold red] "
              f"({collapse.reason or f'worst output cosine {collapse.cosine:.3f} < {collapse.threshold}'}).",
              soft_wrap=True)
    if collapse.layers:
        err.print("most sensitive layers: " + ", ".join(collapse.layers), soft_wrap=True)
    err.print("fix: " + collapse.advice(), soft_wrap=True)
