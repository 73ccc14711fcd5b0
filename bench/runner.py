"""Run the zoo with every tool and method; record metrics, time, memory and latency."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bench.zoo import RESULTS, ZOO, ZooModel, _session
from edgequant.analysis.metrics import FidelityAccumulator

ROOT = Path(__file__).resolve().parents[1]
MAX_RSS_MB = float(os.environ.get("EDGEQUANT_BENCH_MAX_RSS_MB", 12000))  # a job above this is killed


def write_calib(model: ZooModel, n: int, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.npz"))) < n:
        for i, feed in enumerate(model.calib(n)):
            np.savez(folder / f"{i:05d}.npz", **feed)
    return folder


def job_env(tool: str) -> dict[str, str]:
    """The environment of a job: for edgequant, ``EDGEQUANT_BENCH_SRC`` (a ``src`` folder of
    another checkout, e.g. the commit before a rebuild) goes first on PYTHONPATH."""
    env = dict(os.environ)
    src = os.environ.get("EDGEQUANT_BENCH_SRC")
    if src and tool.startswith("edgequant"):
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _rss_mb(pid: int) -> float:
    """Current resident set of process ``pid`` in MB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def watch(cmd: list[str], timeout: float, env: dict | None = None,
          max_rss_mb: float = MAX_RSS_MB) -> tuple[str, str, float]:
    """Run ``cmd`` from the repository root; kill it past ``timeout`` seconds or ``max_rss_mb``.
    Returns (``ok`` | ``exit N`` | ``timeout`` | ``over memory cap``, the tail of stderr, seconds)."""
    start = time.perf_counter()
    with open(os.devnull, "w") as null, subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=null, stderr=subprocess.PIPE, text=True) as proc:
        tail: deque[str] = deque(maxlen=20)
        reader = threading.Thread(target=lambda: tail.extend(proc.stderr), daemon=True)
        reader.start()
        state = "ok"
        while proc.poll() is None:
            if time.perf_counter() - start > timeout:
                state = "timeout"
            elif _rss_mb(proc.pid) > max_rss_mb:
                state = "over memory cap"
            if state != "ok":
                proc.kill()
                break
            time.sleep(0.2)
        proc.wait()
        reader.join(5)
        if state == "ok" and proc.returncode:
            state = f"exit {proc.returncode}"
    return state, "".join(tail), time.perf_counter() - start


def run_job(tool: str, model_path: Path, calib: Path, method: str, n: int, out: Path, timeout: int = 1800,
            options: dict | None = None) -> dict:
    """One ``bench.job`` in its own process; ``options``: more ``edgequant.quantize`` keywords."""
    result = out.with_suffix(".json")
    result.unlink(missing_ok=True)
    python = os.environ.get("EDGEQUANT_BENCH_PPQ_PYTHON", sys.executable) if tool == "ppq" else sys.executable
    cmd = [python, "-m", "bench.job", tool, str(model_path), str(calib), method, str(n), str(out), str(result)]
    if options is not None:
        cmd.append(json.dumps(options, sort_keys=True))
    state, stderr, seconds = watch(cmd, timeout, job_env(tool))
    if state == "timeout":
        return {"status": "timeout", "error": f"over {timeout} s", "seconds": float(timeout), "peak_rss_mb": float("nan")}
    if state == "over memory cap":
        return {"status": "over memory cap", "error": f"killed above {MAX_RSS_MB:.0f} MB RSS after {seconds:.0f} s",
                "seconds": seconds, "peak_rss_mb": MAX_RSS_MB}
    if not result.exists():
        return {"status": "crash", "error": (stderr.strip().splitlines() or [state])[-1][:200],
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


def merge(path: Path, rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """``rows`` plus the rows already in ``path`` that they do not replace (same ``key`` values)."""
    if not path.exists():
        return rows
    new = {tuple(r[k] for k in key) for r in rows}
    return [r for r in json.loads(path.read_text())["rows"] if tuple(r[k] for k in key) not in new] + rows


def edgequant_source() -> dict:
    """Which edgequant the jobs import: its folder, version and (for a git checkout) commit."""
    env = job_env("edgequant")
    code = "import edgequant, pathlib; print(edgequant.__version__, pathlib.Path(edgequant.__file__).parent)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    version, _, folder = out.stdout.strip().partition(" ")
    commit = subprocess.run(["git", "-C", folder or ".", "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", folder or ".", "status", "--porcelain", "--", "."], capture_output=True, text=True)
    return {"edgequant_jobs": version, "edgequant_src": folder, "edgequant_commit": commit.stdout.strip(),
            "edgequant_src_modified": bool(dirty.stdout.strip())}


def cpu_name() -> str:
    """The host's CPU model (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import edgequant

    cpu = cpu_name()
    return {"python": platform.python_version(), "edgequant": edgequant.__version__, "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__, "cpu": cpu, "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), **edgequant_source()}
