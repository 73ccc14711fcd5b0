"""Run the zoo with every tool and method; record metrics, time, memory and latency."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bench.zoo import ZOO, ZooModel, _session
from edgequant.analysis.metrics import FidelityAccumulator

RESULTS = Path(os.environ.get("EDGEQUANT_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def write_calib(model: ZooModel, n: int, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.npz"))) < n:
        for i, feed in enumerate(model.calib(n)):
            np.savez(folder / f"{i:05d}.npz", **feed)
    return folder


def run_job(tool: str, model_path: Path, calib: Path, method: str, n: int, out: Path, timeout: int = 1800) -> dict:
    result = out.with_suffix(".json")
    python = os.environ.get("EDGEQUANT_BENCH_PPQ_PYTHON", sys.executable) if tool == "ppq" else sys.executable
    cmd = [python, "-m", "bench.job", tool, str(model_path), str(calib), method, str(n), str(out), str(result)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"over {timeout} s", "seconds": float(timeout), "peak_rss_mb": float("nan")}
    if not result.exists():
        return {"status": "crash", "error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:200],
                "seconds": float("nan"), "peak_rss_mb": float("nan")}
    return json.loads(result.read_text())


def latency_ms(path_or_bytes, feeds: list[dict], repeat: int = 3) -> float:
    sess = _session(path_or_bytes)
    for f in feeds[:4]:
        sess.run(None, f)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for f in feeds:
            sess.run(None, f)
        best = min(best, (time.perf_counter() - t) / len(feeds) * 1000)
    return best


def fidelity(float_path, quant_path, feeds) -> tuple[float, float]:
    fs, qs = _session(float_path), _session(quant_path)
    acc = FidelityAccumulator()
    for f in feeds:
        acc.update(fs.run(None, f)[0], qs.run(None, f)[0])
    return acc.cosine, acc.sqnr_db


def run(models: list[str], tools: list[str], methods: list[str], n: int = 64) -> list[dict]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in models:
        zm = ZOO[name]()
        path = zm.path()
        calib = write_calib(zm, n, RESULTS / "data" / name)
        feeds = zm.eval_feeds()
        float_metric = zm.evaluate(_session(str(path)))
        float_ms = latency_ms(str(path), feeds)
        for method in methods:
            for tool in tools:
                out = RESULTS / "models" / f"{name}.{tool}.{method}.onnx"
                out.parent.mkdir(parents=True, exist_ok=True)
                job = run_job(tool, path, calib, method, n, out)
                row = {"model": name, "tool": tool, "method": method, "metric_name": zm.metric,
                       "float_metric": float_metric, "float_ms": float_ms, **job}
                if job["status"] == "ok":
                    try:
                        row["quant_metric"] = zm.evaluate(_session(str(out)))
                        row["cosine"], row["sqnr_db"] = fidelity(str(path), str(out), feeds)
                        row["quant_ms"] = latency_ms(str(out), feeds)
                    except Exception as exc:  # an unusable output is a result too
                        row["status"] = "invalid output"
                        row["error"] = str(exc).strip().splitlines()[0][-160:]
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def memory_scaling(model: str, tools: list[str], counts: list[int], method: str = "percentile") -> list[dict]:
    zm = ZOO[model]()
    calib = write_calib(zm, max(counts), RESULTS / "data" / model)
    rows = []
    for tool in tools:
        for n in counts:
            out = RESULTS / "models" / f"mem.{model}.{tool}.{n}.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            job = run_job(tool, zm.path(), calib, method, n, out)
            row = {"model": model, "tool": tool, "method": method, "samples": n, **job}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def environment() -> dict:
    import edgequant

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass


    return {"python": platform.python_version(), "edgequant": edgequant.__version__, "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__, "cpu": cpu, "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}
