"""Keep the benchmark runner from rotting: its smoke run must pass (no timing asserted)."""

import os
import subprocess
import sys
from pathlib import Path


def test_bench_smoke(tmp_path):
    env = dict(os.environ, EDGEQUANT_BENCH_RESULTS=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "bench", "smoke"], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1], env=env)
    assert r.returncode == 0, r.stderr
    assert '"status": "ok"' in r.stdout and '"quant_metric"' in r.stdout
