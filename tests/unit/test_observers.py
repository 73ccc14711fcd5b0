"""Observers: streaming histograms equal a one-shot histogram; searches against brute force."""

import os

import numpy as np
import pytest

from edgequant.calibration.method import Method
from edgequant.calibration.observers import HistogramObserver, MinMaxObserver
from edgequant.calibration.search import percentile_range
from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import compute_params, dequantize_array, quantize_array


def test_minmax_streams_and_ignores_non_finite(rng):
    obs = MinMaxObserver()
    chunks = [rng.standard_normal((4, 8)).astype(np.float32) * (k + 1) for k in range(5)]
    for c in chunks:
        obs.update(c)
    obs.update(np.array([np.nan, np.inf, 1.0], np.float32))
    allx = np.concatenate([c.ravel() for c in chunks])
    assert obs.range(QuantDType.UINT8, False) == (pytest.approx(allx.min()), pytest.approx(allx.max()))


def test_histogram_widening_equals_one_shot(rng):
    """Range doubling merges bins exactly: same counts as histogramming everything at once."""
    obs = HistogramObserver(Method.PERCENTILE, bins=256)
    chunks = [rng.standard_normal(500).astype(np.float32) * s for s in (0.5, 3.0, 1.0, 9.0)]
    for c in chunks:
        obs.update(c)
    allx = np.concatenate(chunks)
    expected, _ = np.histogram(allx, bins=256, range=(-obs.radius, obs.radius))
    expected[127] += expected[128]  # the two bins around zero are one
    expected[128] = 0
    assert obs.radius >= np.abs(allx).max()
    assert obs.hist.sum() == allx.size
    np.testing.assert_array_equal(obs.hist, expected)


def _state(obs):
    return (obs.min, obs.max, obs.radius, obs.pending_zeros, obs.hist.tobytes())


@pytest.mark.parametrize("method", [Method.PERCENTILE, Method.ENTROPY, Method.MSE])
def test_histogram_is_the_same_for_any_order_of_the_batches(method, rng):
    """The grid is fixed by the data's magnitude alone: permuted batches give identical state."""
    chunks = [rng.standard_normal(300).astype(np.float32) * s for s in (0.01, 7.0, 0.3, 130.0, 1.0)]
    chunks.insert(2, np.zeros(40, np.float32))
    states = set()
    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 4, 1, 5, 3], [3, 5, 0, 2, 4, 1]):
        obs = HistogramObserver(method)
        for k in order:
            obs.update(chunks[k])
        states.add(_state(obs))
        assert obs.range(QuantDType.UINT8, False) == obs.range(QuantDType.UINT8, False)
    assert len(states) == 1
    obs = HistogramObserver(method)
    obs.update(np.concatenate(chunks))
    assert {_state(obs)} == states  # and equal to one batch of everything
    amax = max(float(np.abs(c).max()) for c in chunks)
    assert obs.radius / 2 <= amax < obs.radius  # the smallest power of two above max |x|


def test_values_too_small_to_tell_from_zero_land_in_the_central_bin_at_any_radius():
    """Tiny negative values (as GELU's far tail gives) bin alike whether the radius was small
    when they came or has grown since: order-invariant to the last count."""
    tiny = np.array([-1e-30, -3e-20, 0.0, 2e-25, -1e-38], np.float32)
    big = np.array([1000.0, -0.7], np.float32)
    a, b = HistogramObserver(Method.PERCENTILE), HistogramObserver(Method.PERCENTILE)
    a.update(tiny * 1e10)  # radius 2^-57 or so: the values are far from zero here
    a.update(tiny)
    a.update(big)
    b.update(big)
    b.update(tiny)
    b.update(tiny * 1e10)
    assert _state(a) == _state(b)


@pytest.mark.parametrize("kind", ["minmax", "histogram"])
def test_observers_of_two_shards_merge_into_the_observer_of_the_whole(kind, rng):
    def new():
        return MinMaxObserver() if kind == "minmax" else HistogramObserver(Method.PERCENTILE)

    data = [rng.standard_normal(100).astype(np.float32) * s for s in (1, 50, 0.2, 3, 900, 0.5)]
    whole, left, right = new(), new(), new()
    for x in data:
        whole.update(x)
    for x in data[:2]:
        left.update(x)
    for x in data[2:]:
        right.update(x)
    left.merge(right)
    if kind == "minmax":
        assert (left.min, left.max) == (whole.min, whole.max)
    else:
        assert _state(left) == _state(whole)
        both = new()  # a shard of zeros only (no radius yet) merges either way round
        both.update(np.zeros(7, np.float32))
        both.update(data[0])
        for first, second in ((np.zeros(7, np.float32), data[0]), (data[0], np.zeros(7, np.float32))):
            a, b = new(), new()
            a.update(first)
            b.update(second)
            a.merge(b)
            assert _state(a) == _state(both)


def test_histogram_handles_varying_shapes_and_zeros(rng):
    obs = HistogramObserver(Method.PERCENTILE)
    obs.update(np.zeros((1, 3, 5), np.float32))
    obs.update(rng.standard_normal((1, 3, 17)).astype(np.float32))
    obs.update(rng.standard_normal((2, 3, 9)).astype(np.float32))
    assert obs.hist.sum() == 15 + 51 + 54
    assert obs.hist.nbytes == 4096 * 8  # state does not grow with samples


def test_percentile_close_to_numpy(rng):
    x = rng.standard_normal(200_000).astype(np.float32)
    obs = HistogramObserver(Method.PERCENTILE, percentile=99.9)
    for part in np.array_split(x, 10):
        obs.update(part)
    lo, hi = obs.range(QuantDType.INT8, True)
    width = 2 * obs.radius / obs.bins
    assert hi == pytest.approx(np.percentile(x, 99.9), abs=2 * width)
    assert lo == pytest.approx(np.percentile(x, 0.1), abs=2 * width)


def test_percentile_keeps_the_full_range_at_16_bits(rng):
    x = rng.standard_normal(50_000).astype(np.float32)
    obs = HistogramObserver(Method.PERCENTILE, percentile=99.0)
    obs.update(x)
    assert obs.range(QuantDType.INT16, True) == (float(x.min()), float(x.max()))
    assert obs.range(QuantDType.INT8, True)[1] < 0.9 * float(x.max())  # 8 bits clip the tail


def test_percentile_of_empty_histogram():
    assert percentile_range(np.zeros(8, np.int64), np.linspace(-1, 1, 9), 99.0) == (0.0, 0.0)


def _mse(x, lo, hi, dtype, symmetric):
    p = compute_params(lo, hi, dtype, symmetric)
    return float(np.mean((dequantize_array(quantize_array(x, p), p) - x) ** 2))


def test_mse_range_is_near_brute_force_optimum(rng):
    x = np.concatenate([rng.standard_normal(100_000), rng.standard_normal(20) * 40]).astype(np.float32)
    obs = HistogramObserver(Method.MSE)
    obs.update(x)
    lo, hi = obs.range(QuantDType.INT8, True)
    ours = _mse(x, lo, hi, QuantDType.INT8, True)
    alphas = np.linspace(0.01, 1, 200)
    amax = np.abs(x).max()
    best = min(_mse(x, -a * amax, a * amax, QuantDType.INT8, True) for a in alphas)
    assert ours <= best * 1.1
    assert ours < 0.8 * _mse(x, x.min(), x.max(), QuantDType.INT8, True)  # better than minmax


def test_entropy_clips_outliers_but_keeps_the_bulk(rng):
    x = np.concatenate([rng.standard_normal(100_000), [60.0, -55.0]]).astype(np.float32)
    obs = HistogramObserver(Method.ENTROPY)
    obs.update(x)
    lo, hi = obs.range(QuantDType.INT8, True)
    assert 2.0 < hi < 20.0 and -20.0 < lo < -2.0


def test_entropy_nonnegative_range_starts_at_zero(rng):
    x = np.abs(rng.standard_normal(50_000)).astype(np.float32)
    obs = HistogramObserver(Method.ENTROPY)
    obs.update(x)
    lo, hi = obs.range(QuantDType.UINT8, False)
    assert 0.0 <= lo < 1e-3 and 2.0 < hi <= x.max()


def _batches(rng):
    """Batches that exercise every path: zeros first, widening, tiny negatives, NaN and ±inf."""
    return [np.zeros(3000, np.float32), rng.standard_normal(5000).astype(np.float32) * 0.01,
            np.maximum(rng.standard_normal(10000), 0).astype(np.float32),
            np.array([np.nan, 3.0, -np.inf, -1e-30, np.inf, -2.5e-38], np.float32),
            (rng.standard_normal((4, 999)) * 300).astype(np.float32), np.full(7, -0.0, np.float32),
            rng.standard_normal(20000).astype(np.float32),
            # several chunks of 4096 in one tensor, growing, with NaN and inf in a late one
            np.concatenate([rng.standard_normal(5000) * 0.1, rng.standard_normal(5000) * 700, [np.inf, np.nan],
                            rng.standard_normal(9000) * 3e4, np.zeros(4096)]).astype(np.float32)]


@pytest.mark.parametrize("method", [Method.PERCENTILE, Method.ENTROPY])
def test_the_c_kernel_and_numpy_give_the_same_histogram(method, rng, monkeypatch):
    from edgequant.calibration import observers

    if observers._kernels is None:
        assert not os.environ.get("CI"), "the C kernel must be built in CI (setup.py, a C compiler)"
        pytest.skip("edgequant.calibration._kernels is not built here")
    batches = _batches(rng)
    with_c = HistogramObserver(method)
    for b in batches:
        with_c.update(b)
    monkeypatch.setattr(observers, "_kernels", None)
    with_numpy = HistogramObserver(method)
    for b in batches:
        with_numpy.update(b)
    assert _state(with_c) == _state(with_numpy)
    assert with_c.hist.sum() == sum(int(np.isfinite(b).sum()) for b in batches)
    finite = np.concatenate([b[np.isfinite(b)] for b in batches])
    assert (with_c.min, with_c.max) == (float(finite.min()), float(finite.max()))
