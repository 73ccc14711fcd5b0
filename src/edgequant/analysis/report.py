"""Write an ErrorReport: report.md (XQuant-style table), report.html (self-contained), report.json
and PNG plots, into one folder. The folder is written whole or not at all."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from edgequant.analysis.analyze import ErrorReport
from edgequant.analysis.metrics import COSINE_FLAG, SNR_FLAG, Metrics
from edgequant.analysis.plots import histograms_png, summary_png
from edgequant.errors import OutputError
from edgequant.ir.model import creation_mode

TOP = 10


def _num(x: float, digits: int = 6):
    if x is None:
        return None
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return round(float(x), digits)


def _metrics(m: Metrics) -> dict:
    return {k: (_num(v) if isinstance(v, float) else v) for k, v in m.as_dict().items()} | {"flagged": m.flagged}


def to_dict(report: ErrorReport, fixes: list[str]) -> dict:
    """The report as plain JSON-ready data (inf/nan as strings)."""
    return {
        "flags": {"snr_above": SNR_FLAG, "cosine_below": COSINE_FLAG},
        "samples": {"graphwise": report.samples, "layerwise": report.layerwise_samples},
        "outputs": [{"name": r.name, **_metrics(r.metrics)} for r in report.outputs],
        "fixes": fixes,
        "layerwise": [{"node": r.node, "op_type": r.op_type, "depth": r.depth, "inputs": list(r.inputs),
                       "weights": list(r.weights), "weight_sqnr_db": _num(r.weight_sqnr_db) if r.weight_sqnr_db is not None else None,
                       "output_name": r.output_name, "output": _metrics(r.output), "local": _metrics(r.local)}
                      for r in report.layerwise],
        "graphwise": [{"tensor": r.name, "quantized_tensor": r.quant_name, "producer": r.node, "op_type": r.op_type,
                       "depth": r.depth, **_metrics(r.metrics)} for r in report.graphwise],
        "notes": list(report.notes),
    }


def _fmt(x: float, spec: str = ".4f") -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return format(x, spec)


def _flag(m: Metrics) -> str:
    if m.nonfinite:
        return f"⚠ {m.nonfinite} inf/NaN"
    return "⚠" if m.flagged else ""


#: A graphwise tensor's error has jumped where its noise/signal is flagged and at least this
#: many times that of the tensor before it, or its cosine is flagged and fell by more than
#: ``COSINE_DROP``: cumulative error flags every tensor after the first bad one, which says
#: nothing; the jump says where the error comes in.
JUMP = 2.0
COSINE_DROP = 0.01
JUMP_RULE = (f"noise/signal above {SNR_FLAG} and {JUMP:g}× the tensor's before, or cosine below {COSINE_FLAG} "
             f"and {COSINE_DROP} lower than before, or inf/NaN")


def error_jumps(rows: list) -> list[bool]:
    """Per graphwise row (graph order), whether the error jumps there (``JUMP_RULE``)."""
    out, snr, cos = [], 0.0, 1.0
    for r in rows:
        m = r.metrics
        out.append(bool(m.nonfinite) or (m.snr > SNR_FLAG and m.snr >= JUMP * snr)
                   or (m.cosine < COSINE_FLAG and m.cosine < cos - COSINE_DROP))
        snr, cos = m.snr, m.cosine
    return out


def _jump_flag(m: Metrics, jumped: bool) -> str:
    if m.nonfinite:
        return f"⚠ {m.nonfinite} inf/NaN"
    return "⚠" if jumped else ""


def fix_lines(fixes: list[str]) -> tuple[str, str]:
    """(CLI flags, config lines) that apply the overrides."""
    cli = " ".join(f"--override '{f}'" for f in fixes)
    cfg = "quantization_parameters:\n  overrides:\n" + "".join(f"    - \"{f}\"\n" for f in fixes)
    return cli, cfg


def markdown(report: ErrorReport, fixes: list[str], images: list[str]) -> str:
    out = ["# Quantization error report", ""]
    out.append(f"noise/signal: the quantization noise's power over the signal's (XQuant and PPQ call it SNR; lower "
               f"is better, 0.1 is 10 dB of SQNR). Flags: noise/signal > {SNR_FLAG}, cosine < {COSINE_FLAG}, or "
               f"inf/NaN; graphwise rows are flagged where the error jumps ({JUMP_RULE}). "
               f"Samples: {report.samples} (graphwise), {report.layerwise_samples} (layerwise).")
    out += ["", "## Model outputs (quantized model vs float)", "", "| output | cosine | SQNR dB | noise/signal | flag |", "|---|---|---|---|---|"]
    out += [f"| {r.name} | {_fmt(r.metrics.cosine)} | {_fmt(r.metrics.sqnr_db, '.1f')} | {_fmt(r.metrics.snr)} | "
            f"{_flag(r.metrics)} |" for r in report.outputs]
    if fixes:
        cli, cfg = fix_lines(fixes)
        out += ["", "## Suggested fix", "", f"Keep the {len(fixes)} most damaging layers in higher precision "
                "(16-bit activations, or float where quantizing the layer's input gives inf/NaN):", "",
                "```", f"edgequant quantize MODEL --calib DATA {cli}", "```", "", "or in the config file:", "",
                "```yaml", cfg.rstrip(), "```"]
    for img in images:
        out += ["", f"![{img}]({img})"]
    if report.layerwise:
        out += ["", f"## Layerwise: each layer quantized alone (worst {min(TOP, len(report.layerwise))} first)", "",
                "| # | layer | op | output cosine | output noise/signal | layer-output cosine | weight SQNR dB | flag |",
                "|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(report.worst_layers(TOP), 1):
            w = _fmt(r.weight_sqnr_db, ".1f") if r.weight_sqnr_db is not None else ""
            out.append(f"| {i} | {r.node} | {r.op_type} | {_fmt(r.output.cosine)} | {_fmt(r.output.snr)} | "
                       f"{_fmt(r.local.cosine)} | {w} | {_flag(r.output) or _flag(r.local)} |")
    if report.graphwise:
        out += ["", "## Graphwise: every quantized tensor, in graph order", "",
                "| depth | tensor | op | noise/signal | cosine | SQNR dB | MSE | max abs | error jumps here |",
                "|---|---|---|---|---|---|---|---|---|"]
        jumps = error_jumps(report.graphwise)
        out += [f"| {r.depth} | {r.name} | {r.op_type} | {_fmt(r.metrics.snr)} | {_fmt(r.metrics.cosine)} | "
                f"{_fmt(r.metrics.sqnr_db, '.1f')} | {_fmt(r.metrics.mse, '.3g')} | {_fmt(r.metrics.max_abs, '.3g')} | "
                f"{_jump_flag(r.metrics, j)} |" for r, j in zip(report.graphwise, jumps)]
    out += [f"\n> {n}" for n in report.notes]
    return "\n".join(out) + "\n"


_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (t) {
  t.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var rows = Array.from(t.tBodies[0].rows), asc = th.dataset.asc !== '1';
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      });
      th.dataset.asc = asc ? '1' : '0';
      rows.forEach(function (r) { t.tBodies[0].appendChild(r); });
    });
  });
});
"""


def _cell(x, spec: str = ".4f") -> str:
    if isinstance(x, float):
        v = "1e308" if math.isinf(x) and x > 0 else "-1e308" if math.isinf(x) else ("" if math.isnan(x) else repr(x))
        return f'<td data-v="{v}">{html.escape(_fmt(x, spec))}</td>'
    return f"<td>{html.escape(str(x))}</td>"


def _table(headers: list[str], rows: list[list], flagged: list[bool]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(f'<tr class="{"bad" if f else ""}">' + "".join(_cell(c) for c in row) + "</tr>"
                   for row, f in zip(rows, flagged))
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def html_page(report: ErrorReport, fixes: list[str], pngs: dict[str, bytes]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>edgequant error report</title><style>",
             "body{font:14px sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}",
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:nth-child(2){text-align:left}",
             "th{cursor:pointer;background:#eee}tr.bad{background:#fde2e2}pre{background:#f5f5f5;padding:1em}",
             "img{max-width:100%}</style></head><body><h1>Quantization error report</h1>",
             f"<p>noise/signal: the quantization noise's power over the signal's (XQuant and PPQ call it SNR; lower "
             f"is better). Flags: noise/signal &gt; {SNR_FLAG}, cosine &lt; {COSINE_FLAG}, or inf/NaN; graphwise "
             f"rows are flagged where the error jumps ({html.escape(JUMP_RULE)}). Samples: {report.samples} "
             f"(graphwise), {report.layerwise_samples} (layerwise). Click a column to sort.</p>"]
    if report.outputs:
        parts.append("<h2>Model outputs</h2>" + _table(
            ["output", "cosine", "SQNR dB", "noise/signal"],
            [[r.name, r.metrics.cosine, r.metrics.sqnr_db, r.metrics.snr] for r in report.outputs],
            [r.metrics.flagged for r in report.outputs]))
    if fixes:
        cli, cfg = fix_lines(fixes)
        parts.append(f"<h2>Suggested fix</h2><pre>edgequant quantize MODEL --calib DATA {html.escape(cli)}</pre>"
                     f"<p>or in the config file:</p><pre>{html.escape(cfg)}</pre>")
    for name, data in pngs.items():
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>")
    if report.layerwise:
        rows = report.worst_layers(len(report.layerwise))
        parts.append("<h2>Layerwise (each layer quantized alone; worst first)</h2>" + _table(
            ["depth", "layer", "op", "output cosine", "output noise/signal", "output SQNR dB", "layer-output cosine",
             "inf/NaN"],
            [[r.depth, r.node, r.op_type, r.output.cosine, r.output.snr, r.output.sqnr_db, r.local.cosine,
              r.output.nonfinite + r.local.nonfinite] for r in rows],
            [r.output.flagged or r.local.flagged for r in rows]))
    if report.graphwise:
        jumped = {id(r): j for r, j in zip(report.graphwise, error_jumps(report.graphwise))}
        rows2 = report.worst_tensors(len(report.graphwise))
        parts.append("<h2>Graphwise (the quantized model end to end; worst first; red where the error jumps)</h2>"
                     + _table(["depth", "tensor", "op", "noise/signal", "cosine", "SQNR dB", "MSE", "max abs"],
                              [[r.depth, r.name, r.op_type, r.metrics.snr, r.metrics.cosine, r.metrics.sqnr_db,
                                r.metrics.mse, r.metrics.max_abs] for r in rows2],
                              [r.metrics.nonfinite > 0 or jumped[id(r)] for r in rows2]))
    parts += [f"<p><em>{html.escape(n)}</em></p>" for n in report.notes]
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_report(report: ErrorReport, folder: str | os.PathLike, top: int = 5) -> Path:
    """Write report.md, report.html, report.json and the PNG plots into ``folder``."""
    folder = Path(folder)
    parent = folder.parent if str(folder.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"report folder's parent does not exist: {parent}; create it or choose another -o")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder; choose another -o")
    fixes = [str(o) for o in report.fixes(top)]  # text from here on: the files
    pngs = {k: v for k, v in (("summary.png", summary_png(report)), ("histograms.png", histograms_png(report)))
            if v is not None}
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=parent))
    os.chmod(tmp, creation_mode(folder if folder.is_dir() else None, 0o777))  # not mkdtemp's 0700
    try:
        for name, data in pngs.items():
            (tmp / name).write_bytes(data)
        (tmp / "report.md").write_text(markdown(report, fixes, list(pngs)), encoding="utf-8")
        (tmp / "report.html").write_text(html_page(report, fixes, pngs), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(to_dict(report, fixes), indent=1), encoding="utf-8")
        if folder.exists():  # our files replace theirs one by one; nothing else in it is touched
            for f in sorted(tmp.iterdir()):
                os.replace(f, folder / f.name)
            tmp.rmdir()
        else:
            tmp.replace(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
