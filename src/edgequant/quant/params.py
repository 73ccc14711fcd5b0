"""Scale / zero-point maths.

Affine quantization maps a real value ``r`` to an integer ``q``::

    q = clip(round_half_even(r / s) + z, qmin, qmax)        r ≈ s · (q − z)

Edge cases: the range is widened to include 0 so that 0 is exact; a zero-width range gets
``s = 1``; symmetric quantization fixes ``z = 0`` (or the mid-point for unsigned types).

Worked example (uint8, asymmetric, range [-1, 3]): s = 4/255, z = round(0 − (−1)/s) = 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgequant.quant.dtypes import QuantDType


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one tensor (scalars, or 1-D arrays along ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: QuantDType
    axis: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None


def compute_params(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    dtype: QuantDType,
    symmetric: bool,
    axis: int | None = None,
) -> QuantParams:
    """Turn real ranges into scale and zero point (vectorised over channels).

    Symmetric: ``s = max(|rmin|, |rmax|) / ((qmax − qmin) / 2)`` with ``z = 0`` for signed
    types and ``z = (qmax + qmin + 1) / 2`` for unsigned ones. Asymmetric:
    ``s = (rmax − rmin) / (qmax − qmin)``, ``z = round(qmin − rmin / s)``.
    """
    lo = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    qmin, qmax = dtype.qmin, dtype.qmax
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        half = (qmax - qmin) / 2.0 if not dtype.signed else float(qmax)
        scale = amax / half
        zp = np.full_like(scale, 0 if dtype.signed else (qmax + qmin + 1) // 2)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(qmin - lo / safe), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zp = zp.astype(dtype.np_dtype)
    return QuantParams(scale=scale, zero_point=zp, dtype=dtype, axis=axis)


def _broadcast(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def quantize_array(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """QuantizeLinear in numpy: ``clip(rint(x / s) + z, qmin, qmax)`` (half to even)."""
    s = _broadcast(params.scale.astype(np.float32), x.ndim, params.axis)
    z = _broadcast(params.zero_point.astype(np.int64), x.ndim, params.axis)
    q = np.rint(x.astype(np.float32) / s) + z
    return np.clip(q, params.dtype.qmin, params.dtype.qmax).astype(params.dtype.np_dtype)


def dequantize_array(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """DequantizeLinear in numpy: ``s · (q − z)``."""
    s = _broadcast(params.scale.astype(np.float32), q.ndim, params.axis)
    z = _broadcast(params.zero_point.astype(np.int64), q.ndim, params.axis)
    return ((q.astype(np.int64) - z) * s).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Quantize a bias to int32 with ``s_b = s_in · s_w``; returns (q, scale, n_clipped)."""
    scale = (np.float64(input_scale) * weight_scale.astype(np.float64)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    info = np.iinfo(np.int32)
    clipped = int(np.count_nonzero((q < info.min) | (q > info.max)))
    return np.clip(q, info.min, info.max).astype(np.int32), scale, clipped


BIAS_LIMIT = float(np.iinfo(np.int32).max)


def fit_bias(params: QuantParams, bias: np.ndarray, input_scale: float) -> QuantParams | None:
    """Symmetric weight params whose scales are raised where ``bias / (s_in · s_w)`` would
    overflow int32, or None when nothing overflows.

    A channel with near-zero weights gets a tiny scale; its int32 bias then overflows and a
    clipped bias shifts the whole channel. Raising that channel's scale to
    ``|b| / (s_in · (2³¹ − 1))`` keeps the bias exact at the cost of rounding weights that are
    ~0 anyway. Example: b = 1, s_in = 0.01, s_w = 1e-12 → s_w becomes 1e-12 · (1 / 0.0215) ≈ 4.7e-8.
    """
    if np.any(params.zero_point != 0):
        return None
    need = np.abs(bias.astype(np.float64)) / (np.float64(input_scale) * BIAS_LIMIT)
    scale = params.scale.astype(np.float64)
    if params.axis is None:
        need = np.asarray(need.max() if need.size else 0.0)
    if not np.any(need > scale):
        return None
    return QuantParams(np.maximum(scale, need * (1 + 1e-6)).astype(np.float32), params.zero_point, params.dtype,
                       params.axis)
