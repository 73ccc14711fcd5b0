"""Assign parameters: calibrated ranges → activation params; weights → quantized arrays."""

from __future__ import annotations

import numpy as np

from edgequant.calibration.observers import MinMaxObserver
from edgequant.planning.plan import QuantPlan, WeightPlan
from edgequant.quant.params import QuantParams, compute_params, quantize_array


def activation_params(plan: QuantPlan, observers: dict[str, MinMaxObserver]) -> dict[str, QuantParams]:
    """One ``QuantParams`` per calibrated root tensor, from its observer's range."""
    params: dict[str, QuantParams] = {}
    for act in plan.activations.values():
        if act.root in params:
            continue
        lo, hi = plan.pinned[act.root] if act.root in plan.pinned else observers[act.root].range(act.dtype, act.symmetric)
        params[act.root] = compute_params(lo, hi, act.dtype, act.symmetric, scheme=act.scheme)
    return params


WEIGHT_ALPHAS = np.linspace(0.5, 1.0, 11)


def _mse_shrink(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, wp: WeightPlan) -> np.ndarray:
    """Per row, the factor α in [0.5, 1] of its range that minimises the rounding+clipping MSE."""
    best = np.ones(rows.shape[0])
    best_err = np.full(rows.shape[0], np.inf)
    buf = np.empty_like(rows)
    for a in WEIGHT_ALPHAS:
        p = compute_params(lo * a, hi * a, wp.dtype, wp.symmetric, 0, wp.scheme)
        s, z = p.scale[:, None], p.zero_point.astype(np.float32)[:, None]
        np.divide(rows, s, out=buf)  # buf = dequantize(quantize(rows)) − rows, in place
        if wp.scheme.rounding == "half_up":
            buf += 0.5
            np.floor(buf, out=buf)
        else:
            np.rint(buf, out=buf)
        buf += z
        np.clip(buf, -wp.dtype.qmax if wp.scheme.narrow_range and wp.dtype.signed else wp.dtype.qmin,
                wp.dtype.qmax, out=buf)
        buf -= z
        buf *= s
        buf -= rows
        err = np.einsum("ij,ij->i", buf, buf)
        better = err < best_err
        best[better], best_err[better] = a, err[better]
    return best


def weight_params(w: np.ndarray, wp: WeightPlan) -> tuple[np.ndarray, QuantParams]:
    """Range of each output channel (or the whole tensor) → params and the integer weight.

    The range is min/max shrunk by the factor in [0.5, 1] that minimises the channel's
    quantization MSE (rounding and clipping error together); α = 1 is plain min/max.
    """
    rows = (np.moveaxis(w, wp.axis, 0).reshape(w.shape[wp.axis], -1) if wp.axis is not None
            else w.reshape(1, -1)).astype(np.float32)
    lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
    alpha = _mse_shrink(rows, lo, hi, wp)
    lo, hi = lo * alpha, hi * alpha
    if wp.axis is None:
        lo, hi = lo.reshape(()), hi.reshape(())
    params = compute_params(lo, hi, wp.dtype, wp.symmetric, wp.axis, wp.scheme)
    return quantize_array(w, params, wp.scheme), params
