"""``python -m bench speed``: wall time, peak RSS and task accuracy of edgequant against
onnxruntime.quantization on real transformer models with dynamic shapes, at several numbers of
calibration samples. Every job runs in its own process (``bench.job``); the tools alternate
within one run so that a busy machine slows them alike, and the report gives ratios."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from bench.runner import RESULTS, run_job, write_calib
from bench.zoo import ZOO, ZooModel, _session

MODELS = ("ppocr-rec", "minilm")
TOOLS = ("edgequant", "ort-minmax", "ort-percentile")
COUNTS = (64, 512)


def tool_method(name: str) -> tuple[str, str]:
    """``ort-minmax`` → (``ort``, ``minmax``); a bare tool name gets percentile (edgequant's
    default); a ``-padded`` suffix (see ``padded_calib``) is not part of the method."""
    tool, _, method = name.removesuffix("-padded").partition("-")
    return tool, method or "percentile"


def padded_calib(calib: Path, folder: Path) -> Path:
    """A copy of ``calib`` with every input's last dimension zero-padded to its largest size in
    the set (width for PP-OCR, sequence length with attention mask 0 for MiniLM): a variant for
    the calibrators that need one shape for all samples (onnxruntime's histogram methods)."""
    files = sorted(calib.glob("*.npz"))
    if len(list(folder.glob("*.npz"))) == len(files):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    top: dict[str, int] = {}
    for f in files:
        with np.load(f) as z:
            top.update({k: max(top.get(k, 0), z[k].shape[-1]) for k in z.files})
    for f in files:
        with np.load(f) as z:
            np.savez(folder / f.name, **{k: np.pad(z[k], [(0, 0)] * (z[k].ndim - 1) + [(0, top[k] - z[k].shape[-1])])
                                         for k in z.files})
    return folder


def mean_cosine(float_path: Path, quant_path: Path, feeds: list[dict]) -> float:
    """Mean over samples of the cosine between the float and quantized first outputs."""
    fs, qs = _session(str(float_path)), _session(str(quant_path))
    cos = []
    for f in feeds:
        a, b = (np.asarray(s.run(None, f)[0], np.float64).ravel() for s in (fs, qs))
        cos.append(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    return float(np.mean(cos))


def input_dims(calib: Path, n: int) -> dict[str, list[int]]:
    """Per input of the first ``n`` calibration files, the (min, max) of its last dimension."""
    dims: dict[str, list[int]] = {}
    for f in sorted(calib.glob("*.npz"))[:n]:
        with np.load(f) as z:
            for k in z.files:
                d = z[k].shape[-1]
                lo, hi = dims.get(k, [d, d])
                dims[k] = [min(lo, d), max(hi, d)]
    return dims


def score(zm: ZooModel, float_path: Path, out: Path) -> dict:
    """Task metric and mean output cosine of a quantized model; a model onnxruntime cannot run
    is a result (``invalid output``)."""
    try:
        return {"quant_metric": zm.evaluate(_session(str(out))),
                "cosine": mean_cosine(float_path, out, zm.eval_feeds())}
    except Exception as exc:  # an unusable output is a result too
        return {"status": "invalid output", "error": str(exc).strip().splitlines()[0][-160:]}


def _summary(runs: list[dict]) -> dict:
    """One row from repeated jobs: the median time, the largest peak RSS, every time."""
    ok = [r for r in runs if r["status"] == "ok"] or runs
    return {**ok[-1], "seconds": statistics.median(r["seconds"] for r in ok),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "runs": [r["seconds"] for r in runs]}


def measure(name: str, counts: list[int], tools: list[str], repeat: int = 1, timeout: int = 900) -> list[dict]:
    """Rows for one model: every tool at every count, the tools alternating ``repeat`` times."""
    zm = ZOO[name]()
    path = zm.path()
    calib = write_calib(zm, max(counts), RESULTS / "data" / name)
    folders = {t: padded_calib(calib, RESULTS / "data" / f"{name}-padded") if t.endswith("-padded") else calib
               for t in tools}
    base = {"model": name, "metric_name": zm.metric, "float_metric": zm.evaluate(_session(str(path)))}
    rows = []
    for n in counts:
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for _ in range(repeat):
            for t in tools:
                tool, method = tool_method(t)
                out = RESULTS / "models" / f"speed.{name}.{t}.{n}.onnx"
                out.parent.mkdir(parents=True, exist_ok=True)
                runs[t].append(run_job(tool, path, folders[t], method, n, out, timeout))
        for t in tools:
            row = {**base, "tool": t, "method": tool_method(t)[1], "samples": n,
                   "input_dims": input_dims(folders[t], n), **_summary(runs[t])}
            if row["status"] == "ok":
                row.update(score(zm, path, RESULTS / "models" / f"speed.{name}.{t}.{n}.onnx"))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def speed(models: list[str], counts: list[int], tools: list[str], repeat: int = 1, timeout: int = 900) -> list[dict]:
    """All rows of the speed benchmark, model by model."""
    return [row for name in models for row in measure(name, counts, tools, repeat, timeout)]
