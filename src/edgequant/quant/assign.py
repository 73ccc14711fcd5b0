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
        lo, hi = observers[act.root].range(act.dtype, act.symmetric)
        params[act.root] = compute_params(lo, hi, act.dtype, act.symmetric)
    return params


def weight_params(w: np.ndarray, wp: WeightPlan) -> tuple[np.ndarray, QuantParams]:
    """Min/max of each output channel (or the whole tensor) → params and the integer weight."""
    if wp.axis is None:
        lo, hi = np.asarray(w.min()), np.asarray(w.max())
    else:
        moved = np.moveaxis(w, wp.axis, 0).reshape(w.shape[wp.axis], -1)
        lo, hi = moved.min(axis=1), moved.max(axis=1)
    params = compute_params(lo, hi, wp.dtype, wp.symmetric, wp.axis)
    return quantize_array(w, params), params
