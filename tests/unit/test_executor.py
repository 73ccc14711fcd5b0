"""Work units fan out (worker processes; tests/integration has Ray) with the same bytes as here."""

import numpy as np
import pytest

import edgequant
from edgequant.api import calibrate
from edgequant.mixed.sensitivity import sensitivity
from edgequant.pipeline import finish
from edgequant.runtime.executor import InProcess, LocalProcesses, executor_for, shards
from tests.unit.test_quantize_graphs import calib, cnn


def test_shards_cover_the_samples_in_aligned_contiguous_ranges():
    assert shards(10, 1) == [(0, 10)]
    assert shards(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shards(10, 3, align=4) == [(0, 4), (4, 8), (8, 10)]  # starts at multiples of the batch
    assert shards(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert shards(0, 4) == [(0, 0)]
    for count, parts, align in ((97, 4, 1), (97, 4, 8), (5, 2, 3)):
        got = shards(count, parts, align)
        assert got[0][0] == 0 and got[-1][1] == count and all(a[1] == b[0] for a, b in zip(got, got[1:]))
        assert all(lo % align == 0 for lo, _ in got)


def test_executor_follows_the_options():
    assert isinstance(executor_for(1, None), InProcess)
    assert executor_for(3, None).workers == 3
    with pytest.raises(edgequant.ConfigError, match="not both"):
        edgequant.QuantOptions(workers=2, ray_address="127.0.0.1:6379")


def _ranking(state):
    qmodel, _ = state.assemble(state.plan)
    sens = sensitivity(state, qmodel)
    return [(r.node, r.output, r.local, r.weight_sqnr_db) for r in sens.ranked()]


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_worker_processes_give_the_same_model_and_ranking_as_one_process(method, rng, tmp_path):
    model = cnn(rng)
    for i, x in enumerate(calib(rng, 23)):
        np.savez(tmp_path / f"{i:02d}.npz", x=x)
    here = calibrate(model, tmp_path, method=method, batch_size=2)
    there = calibrate(model, tmp_path, method=method, batch_size=2, workers=2)
    assert isinstance(there.executor(), LocalProcesses)
    a, b = finish(here), finish(there)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.summary.calibration_samples == b.summary.calibration_samples == 19
    assert _ranking(here) == _ranking(there)
