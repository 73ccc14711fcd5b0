"""``python -m bench scaling``: how edgequant's quantization time grows with graph size, on the
Conv/Relu chains of bench.chain (2,000 and 8,000 nodes by default), one size per process."""

from __future__ import annotations

import json
import sys

import numpy as np

from bench.runner import RESULTS, job_env, watch

SIZES = (2000, 8000)


def scaling(sizes: list[int], repeat: int = 1, timeout: int = 900) -> list[dict]:
    """One row per size and repetition; sizes alternate between repetitions."""
    rows = []
    for rep in range(repeat):
        for nodes in sizes:
            model = RESULTS / "models" / f"chain{nodes}.onnx"
            out = model.with_suffix(".json")
            model.parent.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "bench.chain", str(nodes), str(model), str(out)]
            state, stderr, seconds = watch(cmd, timeout, job_env("edgequant"))
            row = json.loads(out.read_text()) if out.exists() else {
                "nodes": nodes, "status": state if state != "ok" else "crash",
                "error": (stderr.strip().splitlines() or [state])[-1][:200], "seconds": seconds}
            row["repeat"] = rep
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def ratio(rows: list[dict]) -> float | None:
    """Median time of the largest size over median time of the smallest (None if either failed)."""
    ok = [r for r in rows if r["status"] == "ok"]
    sizes = sorted({r["nodes"] for r in ok})
    if len(sizes) < 2:
        return None
    med = {n: float(np.median([r["seconds"] for r in ok if r["nodes"] == n])) for n in sizes}
    return med[sizes[-1]] / med[sizes[0]]
