"""Range observers. Memory per tensor is constant: running min/max or a 4096-bin histogram.

Every observer is *order-invariant* and *mergeable*: the same samples in any order, or split
into shards observed apart and merged, give the identical state, so calibration can be
sharded and its output bytes do not depend on the order of the files.

The histogram is signed and centred on zero over ``[-R, R)``, where the radius ``R`` is the
smallest power of two strictly greater than every ``|x|`` seen: it depends on the data's
magnitude alone, never on which batch came first. Bins have width ``w = 2R / bins``, a power
of two, so a float32 value's bin ``floor((x + R) / w)`` is computed exactly (in float64, by
``fast_histogram``, one pass in C); the two bins around zero are kept as one *central* bin
``[-w, w)`` (values too small to tell from zero at any radius land there whatever the
radius). When a later batch doubles ``R``, adjacent bin pairs merge (``i → bins/4 + i // 2``,
the central bin taking its two neighbours), and every earlier value lands exactly where it
would have been binned at the new radius. Worked example (8 bins): values {0.3, −0.6} give
R = 1, width 0.25, bins 5 and 1; a later 1.5 makes R = 2, the old counts move to 2 + 5//2 = 4
and 2 + 1//2 = 2, which is where 0.3 and −0.6 fall at width 0.5.
"""

from __future__ import annotations

import math

import numpy as np

from edgequant.calibration.method import Method
from edgequant.calibration.search import best_range, entropy_range, mse_range, percentile_range
from edgequant.quant.dtypes import QuantDType

try:  # the C update (_kernels.c), built where a compiler was at install time; numpy: same bytes
    from edgequant.calibration import _kernels  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the install
    _kernels = None


def _finite(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The values as a flat contiguous float32 array without NaN/Inf, and their min and max."""
    flat = np.ascontiguousarray(x.reshape(-1), np.float32)
    if not flat.size:
        return flat, np.inf, -np.inf
    lo, hi = float(flat.min()), float(flat.max())  # NaN propagates: then it is filtered
    if np.isfinite(lo) and np.isfinite(hi):
        return flat, lo, hi
    flat = flat[np.isfinite(flat)]
    if not flat.size:
        return flat, np.inf, -np.inf
    return flat, float(flat.min()), float(flat.max())


class MinMaxObserver:
    """Running minimum and maximum."""

    #: Whether ``update`` needs the values (a histogram), or only their extremes.
    needs_values = False

    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf

    def update(self, x: np.ndarray) -> None:
        flat, lo, hi = _finite(x)
        if flat.size:
            self.extend(lo, hi)

    def extend(self, lo: float, hi: float) -> None:
        """Observe a batch by its (finite) extremes alone."""
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)

    def merge(self, other: MinMaxObserver) -> None:
        """Fold in an observer of other samples: the result observed both sets."""
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def seen(self) -> bool:
        return self.min <= self.max

    def range(self, dtype: QuantDType, symmetric: bool) -> tuple[float, float]:
        return (self.min, self.max) if self.seen else (0.0, 0.0)


#: Radii never go below this (a power of two), so ``bins / (2R)`` stays a finite float32.
MIN_RADIUS = 2.0**-100


def radius_for(amax: float) -> float:
    """The smallest power of two strictly greater than ``amax`` (and at least MIN_RADIUS)."""
    _, exponent = math.frexp(amax)  # amax = mantissa · 2^exponent, mantissa in [0.5, 1)
    return max(math.ldexp(1.0, exponent), MIN_RADIUS)


def _coarsen(hist: np.ndarray) -> np.ndarray:
    """The histogram at twice the radius: adjacent pairs merged into the central half."""
    out = np.zeros_like(hist)
    q = hist.size // 4
    out[q : q + hist.size // 2] = hist.reshape(-1, 2).sum(axis=1)
    return _fold_centre(out)


def _fold_centre(hist: np.ndarray) -> np.ndarray:
    """Keep the two bins around zero as one: ``[-w, 0)`` and ``[0, w)`` counted at ``bins/2 − 1``."""
    half = hist.size // 2
    hist[half - 1] += hist[half]
    hist[half] = 0
    return hist


class HistogramObserver(MinMaxObserver):
    """Signed histogram over a power-of-two radius; finishes with percentile, entropy or MSE."""

    needs_values = True

    def __init__(self, method: Method, percentile: float = 99.99, bins: int = 4096) -> None:
        super().__init__()
        if bins < 4 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two ≥ 4, got {bins}")
        self.method = method
        self.percentile = percentile
        self.bins = bins
        self.radius = 0.0
        self.hist = np.zeros(bins, dtype=np.int64)
        self.pending_zeros = 0  # exact zeros seen before any non-zero value fixed the radius

    def _own(self) -> None:
        """Make the counts writable (an observer that came back from a worker may hold a
        read-only view of a shared buffer)."""
        if not self.hist.flags.writeable:
            self.hist = self.hist.copy()

    def update(self, x: np.ndarray) -> None:
        if _kernels is not None:  # the same update in C, one pass over the tensor
            self._own()
            flat = np.ascontiguousarray(x.reshape(-1), np.float32)
            self.radius, self.pending_zeros, lo, hi, finite = _kernels.observe(
                flat, self.hist, self.radius, self.pending_zeros)
            if finite:
                self.min, self.max = min(self.min, lo), max(self.max, hi)
            return
        flat, lo, hi = _finite(x)
        if not flat.size:
            return
        self._own()
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(-lo, hi)
        if amax == 0.0 and self.radius == 0.0:
            self.pending_zeros += flat.size
            return
        self._widen(radius_for(amax))
        scaled = flat * np.float32(self.bins / (2.0 * self.radius))  # a power of two: exact
        np.floor(scaled, out=scaled)
        idx = scaled.astype(np.intp)
        idx += self.bins // 2  # |x| < R: every index lies in [0, bins)
        self.hist += np.bincount(idx, minlength=self.bins)
        _fold_centre(self.hist)

    def _widen(self, radius: float) -> None:
        """Grow to ``radius`` (a power of two), merging bin pairs once per doubling."""
        if self.radius == 0.0:
            self.radius = radius
            self.hist[self.bins // 2 - 1] += self.pending_zeros  # zeros: the central bin
            self.pending_zeros = 0
            return
        while radius > self.radius:
            self.hist = _coarsen(self.hist)
            self.radius *= 2.0

    def merge(self, other: MinMaxObserver) -> None:
        """Fold in an observer of other samples; exact: counts add on a common radius."""
        if not isinstance(other, HistogramObserver) or other.bins != self.bins:
            raise ValueError("only histograms of the same size merge")
        self._own()
        super().merge(other)
        if other.radius == 0.0:
            if self.radius == 0.0:
                self.pending_zeros += other.pending_zeros
            else:
                self.hist[self.bins // 2 - 1] += other.pending_zeros
            return
        self._widen(other.radius)
        theirs = other.hist
        r = other.radius
        while r < self.radius:  # bring theirs up to our radius the same way
            theirs = _coarsen(theirs)
            r *= 2.0
        self.hist += theirs

    def range(self, dtype: QuantDType, symmetric: bool) -> tuple[float, float]:
        if not self.seen:
            return (0.0, 0.0)
        if self.radius == 0.0:
            return (self.min, self.max)
        if self.method is Method.SEARCH:
            return self._searched(dtype, symmetric)
        return self._finish(self.method, dtype, symmetric)

    def _edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def _finish(self, method: Method, dtype: QuantDType, symmetric: bool) -> tuple[float, float]:
        """The range ``method`` gives (the histogram is not empty)."""
        if method is Method.MINMAX or (method is Method.PERCENTILE and dtype.bits >= 16):
            return (self.min, self.max)  # 65536 levels resolve the full range: clipping only loses
        edges = self._edges()
        if method is Method.PERCENTILE:
            lo, hi = percentile_range(self.hist, edges, self.percentile)
        elif method is Method.ENTROPY:
            lo, hi = entropy_range(self.hist, edges, dtype, symmetric)
        else:
            lo, hi = mse_range(self.hist, edges, dtype, symmetric, (self.min, self.max))
        return max(lo, self.min), min(hi, self.max)

    def _searched(self, dtype: QuantDType, symmetric: bool) -> tuple[float, float]:
        """Of the ranges minmax, percentile, entropy and mse give, the one quantizing this
        tensor's histogram with the least expected squared error (``best_range``)."""
        candidates = [self._finish(m, dtype, symmetric) for m in _SEARCHED]
        return candidates[best_range(self.hist, self._edges(), dtype, symmetric, candidates)]


#: The methods whose ranges ``Method.SEARCH`` compares, in the order ties are settled.
_SEARCHED = (Method.MINMAX, Method.PERCENTILE, Method.ENTROPY, Method.MSE)


Observer = MinMaxObserver


def make_observer(method: Method, percentile: float) -> MinMaxObserver:
    if method is Method.MINMAX:
        return MinMaxObserver()
    return HistogramObserver(method, percentile)
