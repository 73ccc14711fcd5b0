"""Markdown for ``python -m bench recovery`` (results/recovery.json): the "Accuracy recovery"
section of docs/BENCHMARKS.md. ``recovery_section()`` returns the text ('' without results)."""

from __future__ import annotations

import json
import math

from bench.report_rebuild import _source
from bench.runner import RESULTS


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _f(v, fmt: str) -> str:
    v = _num(v)
    return "–" if v is None else fmt.format(v)


def _delta(v, ref, fmt: str) -> str:
    v, ref = _num(v), _num(ref)
    if v is None or ref is None:
        return ""
    d = v - ref
    return " (±0)" if d == 0 else f" ({fmt.format(d)})"


def _ok(r: dict | None) -> bool:
    return r is not None and r["status"] == "ok"


def _status(r: dict) -> str:
    if r["status"] == "timeout":
        return f"timeout ({r.get('timeout', r['seconds']):.0f} s cap)"
    return f"{r['status']}: {r['error']}" if r.get("error") else r["status"]


def _error(r: dict, plain: dict | None) -> str:
    """1 − cosine, and relative to the plain quantization of the group (below 1× is a gain)."""
    e = 1 - r["cosine"]
    text = f"{e:.2g}"
    if _ok(plain) and r is not plain and 1 - plain["cosine"] > 0:
        ratio = e / (1 - plain["cosine"])
        text += f" ({ratio:.2f}×)" if ratio >= 0.01 else f" ({ratio:.0e}×)"
    return text


def _group_table(rows: list[dict]) -> list[str]:
    """One group: every model, the plain setting first, then each recovery setting against it."""
    lines = ["| model | setting | task metric (Δ vs plain) | cosine | 1 − cosine (× plain) | "
             "quantize s (× plain) | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["order"])
        plain = next((r for r in mine if r["order"] == 0), None)
        for r in mine:
            first = r is mine[0]
            name = f"{model} ({_f(r.get('float_metric'), '{:.3f}')} float)" if first and _num(r.get("float_metric")) \
                is not None else (model if first else "")
            setting = "plain" if r["order"] == 0 else f"`{r['setting']}`"
            if not _ok(r):
                time = f"{r['seconds']:.0f}" if r["status"] == "timeout" else "–"
                lines.append(f"| {name} | {setting} | {_status(r)} | – | – | {time} | "
                             f"{_f(r.get('peak_rss_mb'), '{:.0f}')} |")
                continue
            ref = plain if _ok(plain) and r is not plain else None
            metric = _f(r.get("quant_metric"), "{:.3f}") + (_delta(r.get("quant_metric"), ref.get("quant_metric"),
                                                                  "{:+.3f}") if ref else "")
            cosine = _f(r["cosine"], "{:.4f}")
            speed = f"{r['seconds']:.1f}" + (f" ({r['seconds'] / ref['seconds']:.1f}×)" if ref else "")
            lines.append(f"| {name} | {setting} | {metric} | {cosine} | {_error(r, plain)} | {speed} | "
                         f"{r['peak_rss_mb']:.0f} |")
    return lines


def _best(rows: list[dict], groups: list[str]) -> list[str]:
    """Per model and group: the plain result and the setting with the highest output cosine."""
    lines = ["| model | group | plain: metric / cosine | best setting | its metric / cosine |", "|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for g in groups:
            mine = [r for r in rows if r["model"] == model and r["group"] == g]
            plain = next((r for r in mine if r["order"] == 0 and _ok(r)), None)
            tried = [r for r in mine if r["order"] > 0 and _ok(r)]
            if plain is None or not tried:
                continue
            best = max(tried, key=lambda r: (r["cosine"], _num(r.get("quant_metric")) or 0))
            verdict = f"`{best['setting']}`" if best["cosine"] > plain["cosine"] else f"none (best: `{best['setting']}`)"
            lines.append(f"| {model} | {g} | {_f(plain.get('quant_metric'), '{:.3f}')} / {plain['cosine']:.4f} | "
                         f"{verdict} | {_f(best.get('quant_metric'), '{:.3f}')} / {best['cosine']:.4f} |")
    return lines


def recovery_section(data: dict) -> str:
    rows = data["rows"]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    titles = {r["group"]: r["group_title"] for r in rows}
    caps = {slow: sorted({r["timeout"] for r in rows if "timeout" in r and bool(r["keywords"].get("adaround")) == slow})
            for slow in (False, True)}
    cap = f"{' or '.join(map(str, caps[False])) or '–'} s"
    if caps[True] and caps[True] != caps[False]:
        cap += f" (AdaRound jobs: {' or '.join(map(str, caps[True]))} s)"
    samples = sorted({r["samples"] for r in rows if "samples" in r})
    missing = {r["model"]: r["error"] for r in rows if r["status"] == "model unavailable"}
    parts = ["## Accuracy recovery", "", _source(data["env"]), "",
             "`python -m bench recovery`: per zoo model, the plain quantization of each setting group and each "
             "accuracy-recovery algorithm on top of it (`edgequant.quantize` keywords as written; method percentile "
             "unless the group says otherwise; `eval_samples=0`). Every job quantizes in its own process (wall time "
             "of the quantize call, peak RSS of the process), with the same "
             f"{' or '.join(map(str, samples)) or '–'} calibration files for every setting of a model; a job is killed "
             f"after {cap} (*timeout*). Task metric: the zoo's evaluation (– for "
             "the MediaPipe landmark models, which have no labels); cosine: mean over the zoo's eval feeds of the "
             "first output's cosine to float; *1 − cosine (× plain)*: the remaining output error, and relative to "
             "the plain quantization of the group (below 1× is a gain). AdaRound (default 1000 steps per layer, "
             "PyTorch on the CPU) ran after all the other jobs."]
    commits: dict[str, int] = {}
    for r in rows:
        if r["status"] != "model unavailable":
            c = r.get("edgequant_commit", "not recorded") + (f" on {r['host']}" if r.get("host") else "")
            commits[c] = commits.get(c, 0) + 1
    if len(commits) > 1:
        parts += ["", "edgequant commit (and host, where recorded) per job (`+`: with uncommitted changes; the sources "
                  "changed during the run): "
                  + ", ".join(f"{c} ({n} jobs)" for c, n in commits.items()) + "."]
    if data.get("note"):
        parts += ["", data["note"]]
    if missing:
        parts += ["", "Models left out: " + "; ".join(f"{m} ({e})" for m, e in missing.items()) + "."]
    parts += ["", "### Best setting per model", "", *_best(rows, groups)]
    for g in groups:
        mine = [r for r in rows if r["group"] == g and r["status"] != "model unavailable"]
        if mine:
            parts += ["", f"### {titles[g]}", "", *_group_table(mine)]
    return "\n".join(parts)


def recovery_sections() -> str:
    path = RESULTS / "recovery.json"
    return recovery_section(json.loads(path.read_text())) if path.exists() else ""
