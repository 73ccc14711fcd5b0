"""Weights → integer arrays and their parameters: pure maths on arrays and a spec."""

from __future__ import annotations

import numpy as np

from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import QuantParams, Scheme, compute_params, quantize_array

WEIGHT_ALPHAS = np.linspace(0.5, 1.0, 11)


def _mse_shrink(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, dtype: QuantDType, symmetric: bool,
                scheme: Scheme) -> np.ndarray:
    """Per row, the factor α in [0.5, 1] of its range that minimises the rounding+clipping MSE."""
    best = np.ones(rows.shape[0])
    best_err = np.full(rows.shape[0], np.inf)
    buf = np.empty_like(rows)
    qmin = -dtype.qmax if scheme.narrow_range and dtype.signed else dtype.qmin
    alphas = WEIGHT_ALPHAS[:, None]
    every = compute_params(lo * alphas, hi * alphas, dtype, symmetric, 0, scheme)  # each α at once
    for k, a in enumerate(WEIGHT_ALPHAS):
        s, z = every.scale[k][:, None], every.zero_point[k].astype(np.float32)[:, None]
        np.divide(rows, s, out=buf)  # buf = dequantize(quantize(rows)) − rows, in place
        if scheme.rounding == "half_up":
            buf += 0.5
            np.floor(buf, out=buf)
        else:
            np.rint(buf, out=buf)
        buf += z
        np.clip(buf, qmin, dtype.qmax, out=buf)
        buf -= z
        buf *= s
        buf -= rows
        err = np.einsum("ij,ij->i", buf, buf)
        better = err < best_err
        best[better], best_err[better] = a, err[better]
    return best


def weight_params(w: np.ndarray, dtype: QuantDType, symmetric: bool, axis: int | None,
                  scheme: Scheme, clipping: float | None = None) -> tuple[np.ndarray, QuantParams]:
    """Range of each output channel along ``axis`` (or the whole tensor) → params and the
    integer weight.

    The range is min/max shrunk by the factor in [0.5, 1] that minimises the channel's
    quantization MSE (rounding and clipping error together); α = 1 is plain min/max. A fixed
    ``clipping`` ratio (NeuroPilot's ``weights_quantization_clipping_ratio``) replaces the
    search: every channel keeps ``clipping`` × its min/max (0.9 on [−2, 1] → [−1.8, 0.9]).
    """
    rows = (np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if axis is not None
            else w.reshape(1, -1)).astype(np.float32)
    lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
    alpha = np.full(rows.shape[0], clipping) if clipping is not None else _mse_shrink(rows, lo, hi, dtype,
                                                                                        symmetric, scheme)
    lo, hi = lo * alpha, hi * alpha
    if axis is None:
        lo, hi = lo.reshape(()), hi.reshape(())
    params = compute_params(lo, hi, dtype, symmetric, axis, scheme)
    return quantize_array(w, params, scheme), params
