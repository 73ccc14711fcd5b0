"""Markdown for the rebuild benchmarks: results/speed.json, scaling.json and order.json.

``rebuild_sections()`` returns the text (it writes nothing); bench.report appends it to
docs/BENCHMARKS.md, and ``python -m bench report --print`` shows it.
"""

from __future__ import annotations

import json
import math
import statistics

from bench.runner import RESULTS

GOAL_RATIO = 4.5  # t(8000 nodes) / t(2000 nodes) after the rebuild


def _f(v, fmt: str = "{:.1f}") -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "–"
    return fmt.format(v)


def _source(env: dict) -> str:
    """Which edgequant was measured, and on what."""
    commit = env.get("edgequant_commit", "")[:10] or "?"
    mod = " (with uncommitted changes)" if env.get("edgequant_src_modified") else ""
    return (f"edgequant {env.get('edgequant_jobs', env['edgequant'])} from `{env.get('edgequant_src', '?')}`, "
            f"commit {commit}{mod}; onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, numpy {env['numpy']}; "
            f"{env['cpu']}, {env['cores']} cores; {env['date']}.")


def _cell(r: dict | None, key: str, fmt: str) -> str:
    """A row's value, or what stopped the job (with the seconds it ran, or the memory it had)."""
    if r is None:
        return "not run"
    if r["status"] == "ok" or (key == "seconds" and r["status"] == "invalid output"):
        runs = r.get("runs", [])
        spread = f" [{min(runs):.1f}–{max(runs):.1f}]" if key == "seconds" and len(runs) > 1 else ""
        return _f(r.get(key), fmt) + spread
    if key == "seconds" and r["status"] in ("timeout", "over memory cap", "crash"):
        return f"{r['status']} at {_f(r['seconds'], '{:.0f}')} s"
    if key == "peak_rss_mb" and r["status"] == "over memory cap":
        return f"> {r['peak_rss_mb']:.0f}"
    if key == "peak_rss_mb" and r["status"] == "crash":
        return f"{_f(r['peak_rss_mb'], '{:.0f}')} (crash)"
    return r["status"]


def _ratio(a: dict | None, b: dict | None) -> str:
    if a is None or b is None or a["status"] != "ok" or b["status"] not in ("ok", "invalid output"):
        return "–"
    return f"{a['seconds'] / b['seconds']:.2f}×"


def _dims(r: dict) -> str:
    """The first input's last dimension over the samples, e.g. ``x 66–917``."""
    k, (lo, hi) = next(iter(r["input_dims"].items()), ("–", ("", "")))
    return f"{k} {lo}–{hi}"


def speed_section(data: dict) -> str:
    """Time, peak RSS and accuracy per model and sample count, edgequant against the other tools."""
    rows = data["rows"]
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    others = [t for t in tools if t != "edgequant"]
    keys = list(dict.fromkeys((r["model"], r["samples"]) for r in rows))
    pick = {(r["model"], r["samples"], r["tool"]): r for r in rows}
    head = ["model", "samples", "last dim (min–max)"] + [f"{t} s" for t in tools] + \
        [f"eq / {t}" for t in others] + [f"{t} MB" for t in tools]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, n in keys:
        r = {t: pick.get((model, n, t)) for t in tools}
        any_row = next(x for x in r.values() if x)
        lines.append("| " + " | ".join([model, str(n), _dims(any_row)] + [_cell(r[t], "seconds", "{:.1f}") for t in tools]
                                       + [_ratio(r.get("edgequant"), r[t]) for t in others]
                                       + [_cell(r[t], "peak_rss_mb", "{:.0f}") for t in tools]) + " |")
    head = ["model", "samples", "metric", "float"] + tools + [f"cosine {t}" for t in tools]
    acc = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, n in keys:
        r = {t: pick.get((model, n, t)) for t in tools}
        any_row = next(x for x in r.values() if x)
        acc.append("| " + " | ".join([model, str(n), any_row["metric_name"], _f(any_row["float_metric"], "{:.3f}")]
                                     + [_cell(r[t], "quant_metric", "{:.3f}") for t in tools]
                                     + [_cell(r[t], "cosine", "{:.4f}") for t in tools]) + " |")
    return "\n".join([
        "## Speed and memory on real transformers", "", _source(data["env"]), "",
        "Each job quantizes the model in its own process (wall time of the quantize call, peak RSS of the "
        "process); the tools alternate within one run and the ratios compare jobs of that run. edgequant: "
        "`quantize(model, folder, method='percentile', eval_samples=0)`; ort-*: `quantize_static`, QDQ, "
        "per-channel QInt8 weights, QUInt8 activations, MinMax or Percentile (99.99). Inputs keep their "
        "natural sizes (one sample per file), so the models' dynamic dimensions vary. *-padded*: the same "
        "files zero-padded to the largest size of the set (attention mask 0 beyond a sentence), since "
        "onnxruntime's histogram calibrators need one shape. Times are medians, [range] where a job ran "
        "more than once; *over memory cap*: the bench killed the job above `EDGEQUANT_BENCH_MAX_RSS_MB`.", "",
        *lines, "", "Accuracy of the quantized models (cosine: mean over held-out samples of the output's cosine "
        "to float):", "", *acc])


def _median(rows: list[dict], key: str, fmt: str = "{:.1f}") -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return _f(statistics.median(vals), fmt) if vals else "–"


def scaling_section(data: dict) -> str:
    """Quantization time per chain size (with its parts), and the growth ratio against its goal."""
    rows = data["rows"]
    lines = ["| nodes | Q/DQ nodes | quantize s (each run) | without evaluation s | insert_qdq s | "
             "onnxruntime session of the int8 model s | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for n in sorted({r["nodes"] for r in rows}):
        runs = [r for r in rows if r["nodes"] == n]
        ok = [r for r in runs if r["status"] == "ok"]
        times = ", ".join(_f(r["seconds"]) if r["status"] == "ok" else r["status"] for r in runs)
        lines.append(f"| {n} | {ok[0]['qdq_nodes'] if ok else '–'} | {_median(ok, 'seconds')} ({times}) | "
                     f"{_median(ok, 'no_eval_seconds')} | {_median(ok, 'insert_qdq_seconds', '{:.2f}')} | "
                     f"{_median(ok, 'ort_session_seconds')} | {_median(ok, 'peak_rss_mb', '{:.0f}')} |")
    sizes = sorted({r["nodes"] for r in rows})
    ratio = data.get("ratio")
    verdict = "–" if ratio is None else f"{ratio:.2f}×"
    if ratio is not None and sizes[-1] == 4 * sizes[0]:  # the goal is stated for a 4× larger graph
        verdict += f" ({'met' if ratio <= GOAL_RATIO else '**missed**'}: goal ≤ {GOAL_RATIO}×)"
    return "\n".join([
        "## Time vs graph size", "", _source(data["env"]), "",
        "A chain of Conv 3×3 (8 channels) + Relu on a 1×8×16×16 input, quantized end to end by "
        "`edgequant.quantize` with defaults and 8 random samples (one held out for the fidelity check), one "
        "process per size. Then, in the same process: the call again with `eval_samples=0`, "
        "`transform.qdq.insert_qdq` alone on the same plan, and `onnxruntime.InferenceSession` on the "
        "quantized model (default options, as the fidelity check creates it). Linear growth gives a ratio "
        "equal to the ratio of sizes.", "", *lines, "", f"t({sizes[-1]}) / t({sizes[0]}) (medians): {verdict}"])


def order_section(data: dict) -> str:
    """Per method: are the model bytes the same for every order of the same calibration files?"""
    lines = ["| method | identical bytes across shuffles | same order, run again | largest relative scale difference "
             "| integer initializers that differ |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']} | – | – | – |")
            continue
        same = sum(r["identical"])
        diffs = r["param_differences"]
        lines.append(f"| {r['method']} | {'yes' if r['invariant'] else '**no**'} ({same} of {len(r['identical'])}) | "
                     f"{'yes' if r['repeat_identical'] else '**no**'} | {max(d[0] for d in diffs):.2g} | "
                     f"{max(d[1] for d in diffs)} |")
    first = data["rows"][0]
    return "\n".join([
        "## Order invariance of calibration", "", _source(data["env"]), "",
        f"{first['samples']} MNIST digits of the bundled demo, one per file, copied under {first['shuffles']} "
        "shuffled namings (edgequant reads files in name order) and quantized with each method "
        "(per-channel weights; every file calibrates, none is held out). A method is invariant when the "
        "saved model bytes are identical for every shuffle.", "", *lines])


def rebuild_sections() -> str:
    """The three sections for whichever result files exist ('' if none), each followed by the
    same measurement before the core rebuild where results/before/ holds it."""
    parts = []
    for name, section in (("speed", speed_section), ("scaling", scaling_section), ("order", order_section)):
        path, before = RESULTS / f"{name}.json", RESULTS / "before" / f"{name}.json"
        if path.exists():
            parts.append(section(json.loads(path.read_text())))
        if before.exists():
            title, _, body = section(json.loads(before.read_text())).partition("\n")
            parts.append(f"#{title} — before the core rebuild\n{body}")
    return "\n\n".join(parts)
