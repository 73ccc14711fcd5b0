"""``python -m bench order``: does the order of the calibration files change the model?

The same calibration samples (MNIST digits of the bundled demo, one per .npz) are copied under
shuffled file names (files are read in name order) and quantized by each method, one job per
process (``bench.job``: per-channel weights, every file calibrates, nothing held out, so each
shuffle calibrates on exactly the same set). Per method: whether the saved model bytes are
identical across shuffles, the largest relative difference between their scales, and how many
integer initializers (zero points, quantized weights) differ. Shuffle 0 keeps the original order, run twice, to show that a repeated run is
byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bench.runner import RESULTS, run_job
from edgequant.demo import asset, demo_data

METHODS = ("minmax", "percentile", "entropy", "mse")
SHUFFLES = 3
SAMPLES = 100


def calib_folders(n: int, shuffles: int, seed: int = 0) -> list[Path]:
    """Folder 0: the samples in order; folder k: the same files under a shuffled naming."""
    root = RESULTS / "data" / "order"
    base = root / "order-0"
    base.mkdir(parents=True, exist_ok=True)
    x = demo_data()["calib_x"][:n]
    for i in range(n):
        np.savez(base / f"{i:05d}.npz", image=x[i : i + 1])
    folders = [base]
    rng = random.Random(seed)
    for k in range(1, shuffles + 1):
        folder = root / f"order-{k}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        names = list(range(n))
        rng.shuffle(names)
        for i, name in enumerate(names):
            shutil.copyfile(base / f"{i:05d}.npz", folder / f"{name:05d}.npz")
        folders.append(folder)
    return folders


def param_difference(a: Path, b: Path) -> tuple[float, int]:
    """Between two models' same-named initializers: the largest relative difference of the float
    ones (scales), and how many others (zero points, quantized weights) or unmatched ones differ."""
    init = [{t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer} for p in (a, b)]
    worst, differ = 0.0, len(init[0].keys() ^ init[1].keys())
    for name in init[0].keys() & init[1].keys():
        x, y = init[0][name], init[1][name]
        if x.dtype.kind != "f" or x.shape != y.shape:
            differ += not np.array_equal(x, y)
            continue
        scale = float(np.maximum(np.abs(x), np.abs(y)).max(initial=0.0))
        worst = max(worst, float(np.abs(x.astype(np.float64) - y).max(initial=0.0)) / scale if scale > 0 else 0.0)
    return worst, differ


def _job(method: str, folder: Path, tag: str, n: int) -> dict:
    out = RESULTS / "models" / f"order.{method}.{tag}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    job = run_job("edgequant", asset("mnist_cnn.onnx"), folder, method, n, out, timeout=600)
    job["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest() if job["status"] == "ok" else None
    job["path"] = str(out)
    return job


def order_invariance(methods: list[str], shuffles: int = SHUFFLES, n: int = SAMPLES) -> list[dict]:
    """One row per method: the repeated run and each shuffle against the original order."""
    folders = calib_folders(n, shuffles)
    rows = []
    for method in methods:
        first = _job(method, folders[0], "0", n)
        runs = [_job(method, folders[0], "0-again", n)] + [_job(method, f, str(k), n) for k, f in enumerate(folders[1:], 1)]
        ok = first["status"] == "ok" and all(r["status"] == "ok" for r in runs)
        row = {"method": method, "samples": n, "shuffles": shuffles,
               "status": "ok" if ok else next(r["status"] for r in [first, *runs] if r["status"] != "ok"),
               "repeat_identical": ok and runs[0]["sha256"] == first["sha256"],
               "identical": [r["sha256"] == first["sha256"] for r in runs[1:]] if ok else [],
               "param_differences": [param_difference(Path(first["path"]), Path(r["path"])) for r in runs[1:]]
               if ok else [],
               "seconds": [first["seconds"]] + [r["seconds"] for r in runs], "sha256": first["sha256"]}
        row["invariant"] = ok and all(row["identical"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows
