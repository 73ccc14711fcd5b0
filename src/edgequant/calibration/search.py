"""Range searches over a signed histogram (``hist`` with ``edges``, len(edges) = len(hist)+1).

All are pure functions of the histogram and are vectorised over candidates.
"""

from __future__ import annotations

import numpy as np

from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import compute_params


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


def entropy_range(hist: np.ndarray, edges: np.ndarray, dtype: QuantDType,
                  symmetric: bool) -> tuple[float, float]:
    """The window ``[lo, hi)`` minimising KL(P‖Q) between the clipped and quantized histograms.

    TensorRT's procedure (as onnxruntime's ``get_entropy_threshold``), on the quantizer
    that will actually run. For a threshold of ``i`` bins the window is ``[half − i, half + i)``
    (symmetric grids), or that window cut to the data and stretched to include zero
    (asymmetric: ``[max(half − i, a₀), min(half + i, b₀))``, ``a₀`` = the first non-empty bin or
    the zero bin, ``b₀`` past the last). P is the histogram inside the window with each
    tail's count folded into its edge bin; Q merges the window's bins (tails left out) into
    all ``L = qmax − qmin + 1`` levels and spreads each level's mass over P's non-empty bins:

        KL = Σⱼ pⱼ log pⱼ − Σ_g P_g log(G_g / (n_g·S)),   pⱼ = h′ⱼ / N,

    with ``G_g`` a level's count, ``n_g`` its non-empty bins, ``S`` the window's count. The
    central bin (exact zeros, which quantize exactly) is left out. A window is a candidate
    when it spans at least ``L`` bins (TensorRT's first candidate) and some level holds two
    non-empty bins or more: otherwise Q equals P wherever data lies and KL sees no
    quantization loss at all (an offset distribution cut below its bulk, every value in the
    window's last bin, scores 0). No candidate: the observed window. All candidates are
    evaluated at once from prefix sums.

    Worked example: data uniform on [0.249, 1.75] (R = 2, w = 1/1024, uint8 asymmetric): the
    window [−w, 0.25) holds every value in its last bin, one non-empty bin per level: not a
    candidate (the |x| search scored it 0 and returned 0.25); wider windows pay for the
    folded tail more than they gain in resolution, and the range is the data's.
    """
    n = hist.size
    half = n // 2
    h = hist.astype(np.float64)
    h[half - 1] = 0.0  # the central bin: exact zeros (ReLU, padding) quantize exactly
    levels = dtype.qmax - dtype.qmin + 1
    nz = np.nonzero(h)[0]
    if nz.size == 0:
        return float(edges[half - 1]), float(edges[half + 1])
    a, b = _windows(half, int(nz[0]), int(nz[-1]) + 1, symmetric)
    kl, spare = _window_kl(h, a, b, levels)
    ok = (b - a >= levels) & (spare > 0)
    if not ok.any():
        return float(edges[a[-1]]), float(edges[b[-1]])
    best = int(np.argmin(np.where(ok, kl, np.inf)))
    return float(edges[a[best]]), float(edges[b[best]])


def _windows(half: int, first: int, stop: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Candidate windows ``[a, b)`` for thresholds of 1 … ``half`` bins."""
    i = np.arange(1, half + 1)
    if symmetric:
        return half - i, half + i
    a0 = min(first, half - 1)  # zero is always in the range
    b0 = max(stop, half + 1)
    return np.maximum(half - i, a0), np.minimum(half + i, b0)


def _window_kl(h: np.ndarray, a: np.ndarray, b: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(P‖Q) of every window, and how many more non-empty bins its P has than levels
    holding data (0: each such level holds one non-empty bin, and Q is P without its tails)."""
    cum = np.concatenate([[0.0], np.cumsum(h)])
    nonzero = np.concatenate([[0], np.cumsum(h > 0)])
    hlogh = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    total = cum[-1]
    left, right = cum[a], total - cum[b]
    inside = cum[b] - cum[a]
    first, last = h[a], h[b - 1]
    # edge bins with a tail folded in: their x·log x, and whether they become non-empty
    ent = (hlogh[b] - hlogh[a] - _xlogx(first) - _xlogx(last)
           + _xlogx(first + left) + _xlogx(last + right))
    lift_first = ((first == 0) & (left > 0)).astype(np.int64)
    lift_last = ((last == 0) & (right > 0)).astype(np.int64)
    count = nonzero[b] - nonzero[a] + lift_first + lift_last
    bounds = a[:, None] + (np.arange(levels + 1)[None, :] * (b - a)[:, None]) // levels
    mass = np.diff(cum[bounds], axis=1)  # G_g, tails left out
    bins = np.diff(nonzero[bounds], axis=1).astype(np.float64)
    tails = np.zeros_like(mass)  # P_g − G_g: the tails, in the levels holding the edge bins
    g_first = np.zeros(a.size, dtype=np.int64)
    g_last = np.full(a.size, levels - 1)
    np.add.at(tails, (np.arange(a.size), g_first), left)
    np.add.at(tails, (np.arange(a.size), g_last), right)
    np.add.at(bins, (np.arange(a.size), g_first), lift_first)
    np.add.at(bins, (np.arange(a.size), g_last), lift_last)
    p_g = mass + tails
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(bins > 0, mass / np.maximum(bins, 1) / np.maximum(inside, 1e-300)[:, None], 0.0)
        cross = np.where(p_g > 0, p_g * np.log(np.maximum(q, 1e-12)), 0.0).sum(axis=1)
    kl = (ent - cross) / total - np.log(total)
    return np.where(inside > 0, kl, np.inf), count - (bins > 0).sum(axis=1)


def _xlogx(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


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


#: Points per bin at which ``range_error`` evaluates the error (the bin's mass spread evenly).
SUBPOINTS = 8


def range_error(hist: np.ndarray, edges: np.ndarray, dtype: QuantDType, symmetric: bool,
                ranges: np.ndarray) -> np.ndarray:
    """Expected squared error of fake-quantizing the histogram's values, per candidate range.

    ``ranges`` is ``(C, 2)``; each row becomes scale and zero point exactly as the model's
    parameters will (``compute_params``: zero included, symmetric grids centred), and

        E_c = Σⱼ hⱼ · mean_k (xⱼₖ − s_c·(clip(round(xⱼₖ / s_c) + z_c) − z_c))² / Σ hⱼ,

    with ``xⱼₖ`` ``SUBPOINTS`` evenly spaced points inside bin ``j`` (its mass spread
    uniformly); the central bin ``[−w, w)`` counts as exact zeros. Clipping and rounding are
    both in it. Worked example: 999 values near 1 and one at 100 (uint8): the range [0, 100]
    has step 0.39, error ≈ 999·0.39²/12 / 1000 ≈ 0.013; the range [0, 1.01] clips the one
    outlier, (100 − 1.01)²/1000 ≈ 9.8 — the outlier decides here, as it should.
    """
    half = hist.size // 2
    keep = np.nonzero(hist)[0]
    w = (edges[keep + 1] - edges[keep])[:, None]
    x = edges[keep][:, None] + w * (np.arange(SUBPOINTS) + 0.5) / SUBPOINTS
    x[keep == half - 1] = 0.0
    counts = hist[keep].astype(np.float64)
    params = compute_params(ranges[:, 0], ranges[:, 1], dtype, symmetric)
    s = params.scale.astype(np.float64)[:, None, None]
    z = params.zero_point.astype(np.float64)[:, None, None]
    q = np.clip(np.rint(x[None] / s) + z, dtype.qmin, dtype.qmax)
    err = ((x[None] - (q - z) * s) ** 2).mean(axis=2)
    return (err * counts[None]).sum(axis=1) / max(counts.sum(), 1.0)


def best_range(hist: np.ndarray, edges: np.ndarray, dtype: QuantDType, symmetric: bool,
               ranges: list[tuple[float, float]]) -> int:
    """The index of the candidate range with the least ``range_error`` (the first on ties).

    E.g. values uniform on [0, 1] with candidates [0, 1] (minmax) and [0, 0.9] (clipped):
    clipping costs ∫₀.₉¹ (x − 0.9)² dx ≈ 3.3e−4 against rounding's ≈ 1.3e−6: index 0.
    """
    err = range_error(hist, edges, dtype, symmetric, np.asarray(ranges, dtype=np.float64))
    return int(np.argmin(err))
