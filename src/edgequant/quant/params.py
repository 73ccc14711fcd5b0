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

from edgequant.errors import ConfigError
from edgequant.quant.dtypes import QuantDType


@dataclass(frozen=True)
class Scheme:
    """How a target represents numbers beyond dtype and symmetry.

    * ``power_of_two``: every scale is ``2^exponent`` (ESP-DL ``real = int · 2^exponent``,
      Acuity dynamic fixed point); the exponent is rounded up so the range is never clipped;
    * ``rounding``: ``half_even`` (ONNX QuantizeLinear) or ``half_up`` (``floor(x + 0.5)``),
      applied where edgequant rounds itself: weights and biases;
    * ``narrow_range``: signed weights use −(2^(b−1) − 1)…2^(b−1) − 1 (−127…127 for int8);
    * ``bias_bits``: the accumulator width a bias must fit (32 for most chips).
    """

    power_of_two: bool = False
    rounding: str = "half_even"
    narrow_range: bool = False
    bias_bits: int = 32

    def __post_init__(self) -> None:
        if self.rounding not in ("half_even", "half_up"):
            raise ConfigError(f"rounding {self.rounding!r} must be half_even or half_up")


DEFAULT_SCHEME = Scheme()


def round_values(x: np.ndarray, rounding: str) -> np.ndarray:
    """Round to integers, half to even (``np.rint``) or half up (``floor(x + 0.5)``)."""
    return np.floor(x + 0.5) if rounding == "half_up" else np.rint(x)


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
    scheme: Scheme = DEFAULT_SCHEME,
) -> QuantParams:
    """Turn real ranges into scale and zero point (vectorised over channels).

    Symmetric: ``s = max(|rmin|, |rmax|) / ((qmax − qmin) / 2)`` with ``z = 0`` for signed
    types and ``z = (qmax + qmin + 1) / 2`` for unsigned ones. Asymmetric:
    ``s = (rmax − rmin) / (qmax − qmin)``, ``z = round(qmin − rmin / s)``. With a
    power-of-two scheme ``s`` becomes ``2^ceil(log2 s)`` (e.g. 0.0123 → 2^−6 = 0.015625).
    """
    lo = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    qmin, qmax = dtype.qmin, dtype.qmax
    if scheme.narrow_range and dtype.signed:
        qmin = -qmax
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        half = (qmax - qmin) / 2.0 if not dtype.signed else float(qmax)
        scale = amax / half
        zp = np.full_like(scale, 0 if dtype.signed else (qmax + qmin + 1) // 2)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(qmin - lo / safe), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0)
    if scheme.power_of_two:
        scale = np.exp2(np.ceil(np.log2(scale)))
        if not symmetric:
            zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax)
    scale = scale.astype(np.float32)
    zp = zp.astype(dtype.np_dtype)
    return QuantParams(scale=scale, zero_point=zp, dtype=dtype, axis=axis)


def _broadcast(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def quantize_array(x: np.ndarray, params: QuantParams, scheme: Scheme = DEFAULT_SCHEME) -> np.ndarray:
    """QuantizeLinear in numpy: ``clip(round(x / s) + z, qmin, qmax)`` (half to even unless
    the scheme rounds half up; narrow range starts at −qmax)."""
    s = _broadcast(params.scale.astype(np.float32), x.ndim, params.axis)
    z = _broadcast(params.zero_point.astype(np.int64), x.ndim, params.axis)
    q = round_values(x.astype(np.float32) / s, scheme.rounding) + z
    qmin = -params.dtype.qmax if scheme.narrow_range and params.dtype.signed else params.dtype.qmin
    return np.clip(q, qmin, params.dtype.qmax).astype(params.dtype.np_dtype)


def dequantize_array(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """DequantizeLinear in numpy: ``s · (q − z)``."""
    s = _broadcast(params.scale.astype(np.float32), q.ndim, params.axis)
    z = _broadcast(params.zero_point.astype(np.int64), q.ndim, params.axis)
    return ((q.astype(np.int64) - z) * s).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray,
                  scheme: Scheme = DEFAULT_SCHEME) -> tuple[np.ndarray, np.ndarray, int]:
    """Quantize a bias to int32 with ``s_b = s_in · s_w``, limited to ``scheme.bias_bits``;
    returns (q, scale, n_clipped)."""
    scale = (np.float64(input_scale) * weight_scale.astype(np.float64)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = round_values(bias.astype(np.float64) / scale.astype(np.float64), scheme.rounding)
    hi = float(2 ** (scheme.bias_bits - 1) - 1)
    clipped = int(np.count_nonzero((q < -hi - 1) | (q > hi)))
    return np.clip(q, -hi - 1, hi).astype(np.int32), scale, clipped


def fit_bias(params: QuantParams, bias: np.ndarray, input_scale: float,
             scheme: Scheme = DEFAULT_SCHEME) -> QuantParams | None:
    """Symmetric weight params whose scales are raised where ``bias / (s_in · s_w)`` would
    overflow the ``scheme.bias_bits`` accumulator, or None when nothing overflows.

    A channel with near-zero weights gets a tiny scale; its int32 bias then overflows and a
    clipped bias shifts the whole channel. Raising that channel's scale to
    ``|b| / (s_in · (2^(bits−1) − 1))`` keeps the bias exact at the cost of rounding weights that are
    ~0 anyway. Example: b = 1, s_in = 0.01, s_w = 1e-12 → s_w becomes 1e-12 · (1 / 0.0215) ≈ 4.7e-8.
    """
    if np.any(params.zero_point != 0):
        return None
    limit = float(2 ** (scheme.bias_bits - 1) - 1)
    need = np.abs(bias.astype(np.float64)) / (np.float64(input_scale) * limit)
    scale = params.scale.astype(np.float64)
    if params.axis is None:
        need = np.asarray(need.max() if need.size else 0.0)
    if not np.any(need > scale):
        return None
    new = np.maximum(scale, need * (1 + 1e-6))
    if scheme.power_of_two:
        new = np.exp2(np.ceil(np.log2(new)))
    return QuantParams(new.astype(np.float32), params.zero_point, params.dtype, params.axis)
