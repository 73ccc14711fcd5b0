"""Range observers. Memory per tensor is constant: running min/max or a 4096-bin histogram.

The histogram is signed and centred on zero over ``[-R, R]``. When a batch exceeds ``R`` the
range doubles and adjacent bin pairs merge, so bin edges stay aligned and no sample is kept.
Indices are computed once per batch and counted with ``np.bincount``.
"""

from __future__ import annotations

import numpy as np

from edgequant.calibration.search import entropy_threshold, mse_range, percentile_range
from edgequant.planning.options import Method
from edgequant.quant.dtypes import QuantDType


def _finite(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The values as a flat float32 array without NaN/Inf, and their min and max."""
    flat = x.reshape(-1)
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    if not flat.size:
        return flat, np.inf, -np.inf
    lo, hi = float(flat.min()), float(flat.max())
    if np.isfinite(lo) and np.isfinite(hi):
        return flat, lo, hi
    flat = flat[np.isfinite(flat)]
    if not flat.size:
        return flat, np.inf, -np.inf
    return flat, float(flat.min()), float(flat.max())


class MinMaxObserver:
    """Running minimum and maximum."""

    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf

    def update(self, x: np.ndarray) -> None:
        flat, lo, hi = _finite(x)
        if flat.size:
            self.min = min(self.min, lo)
            self.max = max(self.max, hi)

    @property
    def seen(self) -> bool:
        return self.min <= self.max

    def range(self, dtype: QuantDType, symmetric: bool) -> tuple[float, float]:
        return (self.min, self.max) if self.seen else (0.0, 0.0)


class HistogramObserver(MinMaxObserver):
    """Signed histogram with range doubling; finishes with percentile, entropy or MSE."""

    def __init__(self, method: Method, percentile: float = 99.99, bins: int = 4096) -> None:
        super().__init__()
        self.method = method
        self.percentile = percentile
        self.bins = bins
        self.radius = 0.0
        self.hist = np.zeros(bins, dtype=np.int64)
        self.pending_zeros = 0

    def update(self, x: np.ndarray) -> None:
        flat, lo, hi = _finite(x)
        if not flat.size:
            return
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(-lo, hi)
        if amax == 0.0 and self.radius == 0.0:
            self.pending_zeros += flat.size
            return
        self._widen(amax)
        scaled = flat * np.float32(self.bins / (2.0 * self.radius))
        scaled += np.float32(self.bins // 2)
        idx = scaled.astype(np.intp)  # values lie in [-R, R]: only x = R lands one past the end
        np.minimum(idx, self.bins - 1, out=idx)
        np.maximum(idx, 0, out=idx)
        self.hist += np.bincount(idx, minlength=self.bins)

    def _widen(self, amax: float) -> None:
        if self.radius == 0.0:
            self.radius = amax
            self.hist[self.bins // 2] += self.pending_zeros
            self.pending_zeros = 0
            return
        while amax > self.radius:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.zeros_like(self.hist)
            q = self.bins // 4
            self.hist[q : q + self.bins // 2] = merged
            self.radius *= 2.0

    def range(self, dtype: QuantDType, symmetric: bool) -> tuple[float, float]:
        if not self.seen:
            return (0.0, 0.0)
        if self.radius == 0.0:
            return (self.min, self.max)
        if self.method is Method.PERCENTILE and dtype.bits >= 16:
            return (self.min, self.max)  # 65536 levels resolve the full range: clipping only loses
        edges = np.linspace(-self.radius, self.radius, self.bins + 1)
        if self.method is Method.PERCENTILE:
            lo, hi = percentile_range(self.hist, edges, self.percentile)
        elif self.method is Method.ENTROPY:
            t = entropy_threshold(self.hist, edges, dtype, nonnegative=self.min >= 0)
            lo, hi = -t, t
        else:
            lo, hi = mse_range(self.hist, edges, dtype, symmetric, (self.min, self.max))
        return max(lo, self.min), min(hi, self.max)


def make_observer(method: Method, percentile: float) -> MinMaxObserver:
    if method is Method.MINMAX:
        return MinMaxObserver()
    return HistogramObserver(method, percentile)
