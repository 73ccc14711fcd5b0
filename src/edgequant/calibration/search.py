"""Range searches over a signed histogram (``hist`` with ``edges``, len(edges) = len(hist)+1).

All three are pure functions of the histogram and are vectorised over candidates.
"""

from __future__ import annotations

import numpy as np

from edgequant.quant.dtypes import QuantDType


def percentile_range(hist: np.ndarray, edges: np.ndarray, percentile: float) -> tuple[float, float]:
    """Clip ``100 − p`` percent of the mass at each tail.

    ``lo`` is the left edge of the bin where the cumulative count first exceeds
    ``(1 − p/100)·N``; ``hi`` the right edge of the bin where it reaches ``p/100·N`` (bin
    edges, as onnxruntime's percentile calibrator takes them: a cut rounds outwards by at
    most one bin).
    """
    cdf = np.cumsum(hist)
    total = cdf[-1]
    if total == 0:
        return 0.0, 0.0
    tail = (1.0 - percentile / 100.0) * total
    lo_bin = int(np.searchsorted(cdf, tail, side="right"))
    hi_bin = int(np.searchsorted(cdf, total - tail, side="left"))
    lo_bin = min(lo_bin, len(hist) - 1)
    hi_bin = min(hi_bin, len(hist) - 1)
    return float(edges[lo_bin]), float(edges[hi_bin + 1])


def _levels(dtype: QuantDType, nonnegative: bool) -> int:
    span = dtype.qmax - dtype.qmin + 1
    return span if nonnegative else span // 2


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, dtype: QuantDType,
                      nonnegative: bool, candidates: int = 160) -> float:
    """The |x| threshold minimising KL(P‖Q) between the clipped and quantized distributions.

    TensorRT's procedure on the magnitude histogram: for threshold bin ``i``, P is the
    histogram up to ``i`` with the tail folded into the last bin; Q merges P's bins into
    ``levels`` groups and spreads each group's mass over its non-empty bins.
    """
    half = len(hist) // 2
    mag = hist[half:].astype(np.float64) + hist[:half][::-1]
    mag[0] = 0.0  # exact zeros (ReLU, padding) quantize exactly; they must not drive the search
    width = float(edges[-1]) / half
    levels = _levels(dtype, nonnegative)
    nz = np.nonzero(mag)[0]
    top = int(nz[-1]) + 1 if nz.size else 1
    if levels >= top:
        return top * width
    starts = np.unique(np.linspace(levels, top, candidates).astype(np.int64))
    divergences = np.array([_kl_at(mag, int(i), levels) for i in starts])
    best = int(starts[int(np.argmin(divergences))])
    return best * width


def _kl_at(mag: np.ndarray, i: int, levels: int) -> float:
    p = mag[:i].copy()
    p[-1] += mag[i:].sum()
    bounds = (np.arange(levels + 1) * i) // levels
    starts = bounds[:-1]
    sums = np.add.reduceat(mag[:i], starts)
    nonzero = np.add.reduceat((mag[:i] > 0).astype(np.float64), starts)
    avg = np.divide(sums, nonzero, out=np.zeros_like(sums), where=nonzero > 0)
    q = np.repeat(avg, np.diff(bounds)) * (mag[:i] > 0)
    ps, qs = p.sum(), q.sum()
    if ps == 0 or qs == 0:
        return np.inf
    p, q = p / ps, q / qs
    mask = p > 0
    qm = np.where(q[mask] > 0, q[mask], 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / qm)))


def mse_range(hist: np.ndarray, edges: np.ndarray, dtype: QuantDType, symmetric: bool,
              observed: tuple[float, float], candidates: int = 100) -> tuple[float, float]:
    """The range ``α·[min, max]`` (α in (0, 1]) minimising the expected quantization MSE.

    Error is evaluated at bin centres, weighted by counts, for all candidates at once.
    """
    centres = (edges[:-1] + edges[1:]) / 2.0
    keep = hist > 0
    c, w = centres[keep], hist[keep].astype(np.float64)
    lo, hi = min(observed[0], 0.0), max(observed[1], 0.0)
    alphas = np.linspace(1.0 / candidates, 1.0, candidates)[:, None]
    qmin, qmax = dtype.qmin, dtype.qmax
    scale: np.ndarray
    zp: np.ndarray
    if symmetric:
        amax = max(-lo, hi) * alphas
        scale = amax / (qmax if dtype.signed else (qmax - qmin) / 2.0)
        zp = np.full_like(scale, 0.0 if dtype.signed else (qmax + qmin + 1) // 2)
    else:
        scale = (hi - lo) * alphas / float(qmax - qmin)
        zp = np.clip(np.rint(qmin - lo * alphas / np.where(scale > 0, scale, 1)), qmin, qmax)
    scale = np.where(scale > 0, scale, 1e-12)
    q: np.ndarray = np.clip(np.rint(c[None, :] / scale) + zp, qmin, qmax)
    err = ((c[None, :] - (q - zp) * scale) ** 2 * w[None, :]).sum(axis=1)
    a = float(alphas[int(np.argmin(err)), 0])
    if symmetric:
        m = max(-lo, hi) * a
        return -m, m
    return lo * a, hi * a
