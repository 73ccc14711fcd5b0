"""One weighted ONNX layer as the rounding algorithms see it: a linear map on input patches.

Every supported layer computes, per group ``g`` and input row ``r``::

    y[g, r, o] = Σ_i  P[g, r, i] · M[g, o, i]          (no bias)

with ``M = layer.matrix()`` of shape [G, O_g, I_g] and ``P = layer.patches(x)`` of shape
[G, R, I_g]. For a Conv, ``P`` is im2col of the padded input (one row per output position of
each sample, columns ordered (input channel of the group, kernel offsets) like the weight);
for Gemm ``P = alpha · x``; for MatMul the rows of ``x`` flattened to [R, K].

Worked example: a Conv with weight [32, 16, 3, 3], group 1, on x [2, 16, 8, 8] with pads 1 has
``M`` [1, 32, 144] and ``P`` [1, 128, 144] (2 samples × 8 × 8 positions); a depthwise Conv
with weight [16, 1, 3, 3], group 16, has ``M`` [16, 1, 9] and ``P`` [16, 128, 9].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgequant.errors import ConfigError, NotYetSupportedError
from edgequant.quant.params import QuantParams, Scheme

SUPPORTED_OPS = ("Conv", "Gemm", "MatMul")


def quant_range(params: QuantParams, scheme: Scheme) -> tuple[int, int]:
    """(qmin, qmax) of the weight integers: narrow range starts at −qmax for signed types
    (int8 narrow: −127…127), as in ``quantize_array``."""
    dtype = params.dtype
    qmin = -dtype.qmax if scheme.narrow_range and dtype.signed else dtype.qmin
    return qmin, dtype.qmax


def _explicit_pads(attrs: dict[str, Any]) -> bool:
    """Conv padding given by ``pads`` (auto_pad NOTSET, or VALID: no padding)."""
    mode = attrs.get("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return mode == "NOTSET" or (mode == "VALID" and not any(attrs.get("pads", [])))


def supported(node: Any) -> bool:
    """Whether an ONNX ``NodeProto`` can be a ``Layer``, judged by its op type and attributes
    (Conv with explicit pads, Gemm with transA 0, MatMul); ``Layer`` checks the weight's shape."""
    from onnx import helper

    if node.op_type not in SUPPORTED_OPS:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return _explicit_pads(attrs)
    return not (node.op_type == "Gemm" and attrs.get("transA", 0))


@dataclass(frozen=True, eq=False)
class Layer:
    """A Conv (1-3 spatial dims), Gemm (transA 0) or MatMul (2-D weight) with its weight
    initializer and ONNX attributes. Compared by identity (it holds an array)."""

    op_type: str
    weight: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.op_type not in SUPPORTED_OPS:
            raise NotYetSupportedError(f"rounding layer {self.op_type!r}: supported ops are {SUPPORTED_OPS}")
        w = self.weight
        if self.op_type == "Conv":
            if not 3 <= w.ndim <= 5:
                raise ConfigError(f"Conv weight of shape {w.shape} must have 1-3 spatial dims")
            if w.shape[0] % self.groups:
                raise ConfigError(f"Conv weight {w.shape}: {w.shape[0]} outputs not divisible by group {self.groups}")
            if not _explicit_pads(self.attrs):
                raise NotYetSupportedError("Conv auto_pad SAME_*: give explicit pads (auto_pad NOTSET)")
            nd = w.ndim - 2
            for key, n in (("strides", nd), ("dilations", nd), ("pads", 2 * nd)):
                if key in self.attrs and len(self.attrs[key]) != n:
                    raise ConfigError(f"Conv {key} {self.attrs[key]} must have {n} values")
        else:
            if w.ndim != 2:
                raise NotYetSupportedError(f"{self.op_type} weight of shape {w.shape}: only 2-D weights")
            if self.op_type == "Gemm" and self.attrs.get("transA", 0):
                raise NotYetSupportedError("Gemm with transA=1: transpose the input first")

    # -- shapes ---------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        """G: Conv ``group`` (1 for Gemm/MatMul)."""
        return int(self.attrs.get("group", 1)) if self.op_type == "Conv" else 1

    @property
    def transposed(self) -> bool:
        """True when the initializer is [K, N] (Gemm transB=0, MatMul)."""
        return self.op_type == "MatMul" or (self.op_type == "Gemm" and not self.attrs.get("transB", 0))

    @property
    def kernel(self) -> tuple[int, ...]:
        """Conv kernel shape (empty for Gemm/MatMul)."""
        return tuple(self.weight.shape[2:]) if self.op_type == "Conv" else ()

    def _conv_attr(self, key: str, default: int) -> tuple[int, ...]:
        nd = len(self.kernel)
        return tuple(int(v) for v in self.attrs.get(key, [default] * (2 * nd if key == "pads" else nd)))

    def matrix(self, w: np.ndarray | None = None) -> np.ndarray:
        """The weight (or ``w`` of the initializer's shape) as [G, O_g, I_g]."""
        w = self.weight if w is None else w
        if self.op_type == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        return (w.T if self.transposed else w)[None]

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        """Inverse of ``matrix``: [G, O_g, I_g] → the initializer's shape."""
        if self.op_type == "Conv":
            return m.reshape(self.weight.shape)
        return m[0].T if self.transposed else m[0]

    def out_channel(self, axis: int | None) -> np.ndarray | None:
        """Index into a per-channel params vector (along ``axis``, as ``weight_axis`` gives it)
        for each matrix row, as an int array [G, O_g]; None for per-tensor params.

        Example: Conv weight [4, 1, 3, 3] group 2 → [[0, 1], [2, 3]]; Gemm transB=0 weight
        [K, N] with axis 1 → [[0 … N−1]]. An axis that is not the output channel is an error.
        """
        if axis is None:
            return None
        w = self.weight
        out_axis = 0 if self.op_type == "Conv" else (1 if self.transposed else 0)
        if axis % w.ndim != out_axis:
            raise NotYetSupportedError(f"{self.op_type} weight {w.shape}: per-channel axis {axis} is not "
                                       f"the output-channel axis {out_axis}")
        return np.arange(w.shape[out_axis]).reshape(self.groups, -1)

    def row_params(self, params: QuantParams) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point laid out to broadcast against the matrix: [G, O_g, 1] float64
        per channel, 0-d arrays per tensor."""
        index = self.out_channel(params.axis)
        s = np.asarray(params.scale, np.float32).astype(np.float64)
        z = np.asarray(params.zero_point).astype(np.float64)
        if index is None:
            return s.reshape(()), z.reshape(())
        return s[index][..., None], z[index][..., None]

    # -- inputs ---------------------------------------------------------------------------
    def _conv_geometry(self, x: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(padded input spatial shape, output spatial shape) of a Conv input."""
        k, strides = self.kernel, self._conv_attr("strides", 1)
        dil, pads = self._conv_attr("dilations", 1), self._conv_attr("pads", 0)
        nd = len(k)
        if x.ndim != nd + 2 or x.shape[1] != self.weight.shape[1] * self.groups:
            raise ConfigError(f"Conv input of shape {x.shape} does not match weight {self.weight.shape} "
                              f"with group {self.groups}")
        padded = tuple(x.shape[2 + d] + pads[d] + pads[nd + d] for d in range(nd))
        out = tuple((padded[d] - dil[d] * (k[d] - 1) - 1) // strides[d] + 1 for d in range(nd))
        return padded, out

    def row_count(self, x: np.ndarray) -> int:
        """R: the number of patch rows of ``x`` (all samples)."""
        if self.op_type == "Conv":
            return x.shape[0] * int(np.prod(self._conv_geometry(x)[1]))
        return int(np.prod(x.shape[:-1]))

    def _pad(self, x: np.ndarray) -> np.ndarray:
        pads, nd = self._conv_attr("pads", 0), len(self.kernel)
        return np.pad(x, [(0, 0), (0, 0)] + [(pads[d], pads[nd + d]) for d in range(nd)])

    def _gather(self, xp: np.ndarray, out: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
        """im2col rows of a padded Conv input: ``P[r, c, k] = xp[n, c, o·stride + k·dilation]``."""
        strides, dil = self._conv_attr("strides", 1), self._conv_attr("dilations", 1)
        n, pos = np.divmod(rows, int(np.prod(out)))
        out_idx = np.unravel_index(pos, out)
        k_idx = np.unravel_index(np.arange(int(np.prod(self.kernel))), self.kernel)
        coords = [(o * s)[:, None, None] + (k * d)[None, None, :]
                  for o, k, s, d in zip(out_idx, k_idx, strides, dil)]
        channels = np.arange(xp.shape[1])[None, :, None]
        cols = xp[tuple([n[:, None, None], channels] + coords)]  # [rows, C, K]
        g = self.groups
        return cols.reshape(len(rows), g, -1).transpose(1, 0, 2)

    def patch_rows(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The patch rows ``rows`` (indices into 0…R−1) of ``x`` as [G, len(rows), I_g]."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.op_type == "Conv":
            return self._gather(self._pad(x), self._conv_geometry(x)[1], rows)
        flat = x.reshape(-1, x.shape[-1])[rows]
        alpha = float(self.attrs.get("alpha", 1.0)) if self.op_type == "Gemm" else 1.0
        return (flat * np.float32(alpha) if alpha != 1.0 else flat)[None]

    def _window(self, xp: np.ndarray) -> np.ndarray:
        """im2col of whole padded samples by a strided view: [n, C, *S] → [G, n·P, I_g]."""
        k, strides = self.kernel, self._conv_attr("strides", 1)
        dil, nd = self._conv_attr("dilations", 1), len(self.kernel)
        extent = tuple(d * (kk - 1) + 1 for kk, d in zip(k, dil))
        view = np.lib.stride_tricks.sliding_window_view(xp, extent, axis=tuple(range(2, 2 + nd)))
        steps = [slice(None), slice(None)] + [slice(None, None, s) for s in strides]
        view = view[tuple(steps + [slice(None, None, d) for d in dil])]  # [n, C, *out, *k]
        order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
        rows = view.transpose(order).reshape(-1, self.groups, xp.shape[1] // self.groups * int(np.prod(k)))
        return rows.transpose(1, 0, 2)

    def patches(self, x: np.ndarray) -> np.ndarray:
        """All patch rows of ``x`` (Conv [N, C, *S], Gemm [M, K], MatMul [..., K]) as [G, R, I_g]."""
        if self.op_type == "Conv":
            self._conv_geometry(x)
            return np.ascontiguousarray(self._window(self._pad(x)))
        return self.patch_rows(x, np.arange(self.row_count(x)))

    def iter_patches(self, x: np.ndarray, max_elements: int = 1 << 22) -> Iterator[np.ndarray]:
        """All patch rows in consecutive chunks of about ``max_elements`` values (at least one
        sample, or one row for Gemm/MatMul), so that memory stays bounded."""
        g, _, i_g = self.matrix().shape
        if self.op_type == "Conv":
            per_sample = int(np.prod(self._conv_geometry(x)[1])) * g * i_g
            step = max(1, max_elements // per_sample)
            for start in range(0, x.shape[0], step):
                yield self._window(self._pad(x[start:start + step]))
            return
        total, step = self.row_count(x), max(1, max_elements // (g * i_g))
        for start in range(0, total, step):
            yield self.patch_rows(x, np.arange(start, min(total, start + step)))

    # -- outputs --------------------------------------------------------------------------
    def output_rows(self, y: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """A layer output in ONNX layout (Conv [N, O, *S'], Gemm [M, N], MatMul [..., N]) as
        [G, R, O_g], row ``r`` matching patch row ``r``; only ``rows`` when given."""
        g = self.groups
        if self.op_type == "Conv":
            flat = y.reshape(y.shape[0], y.shape[1], -1)
            if rows is None:
                picked = flat.transpose(0, 2, 1).reshape(-1, y.shape[1])
            else:
                n, pos = np.divmod(np.asarray(rows, np.int64), flat.shape[2])
                picked = flat[n, :, pos]
            return picked.reshape(picked.shape[0], g, -1).transpose(1, 0, 2)
        flat2 = y.reshape(-1, y.shape[-1])
        return (flat2 if rows is None else flat2[np.asarray(rows, np.int64)])[None]

    def forward(self, x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        """The layer output without bias, in ONNX layout, with the initializer or ``w``:
        ``y = P · Mᵀ`` per group, laid out back (Conv [N, O, *S'], Gemm [M, N], MatMul [..., N])."""
        m = self.matrix(w).astype(np.float32)
        y = np.concatenate([_apply(chunk, m) for chunk in self.iter_patches(x)], axis=1)  # [G, R, O_g]
        if self.op_type == "Conv":
            out = self._conv_geometry(x)[1]
            rows = y.transpose(1, 0, 2).reshape(x.shape[0], *out, -1)
            return np.ascontiguousarray(np.moveaxis(rows, -1, 1))
        return y[0].reshape(*x.shape[:-1], y.shape[2])


def _apply(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``P · Mᵀ`` per group; a broadcast product for one output per group (depthwise), where
    numpy's batched matmul of tiny matrices is slow."""
    if m.shape[1] == 1 and m.shape[0] > 1:
        return np.einsum("gri,gi->gr", p, m[:, 0])[..., None]
    return group_matmul(p, m.transpose(0, 2, 1))


def group_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a[g] @ b[g]`` for every group; 2-D BLAS products when there are few groups (numpy's
    batched matmul can take a slow loop on [1, R, I] operands)."""
    if a.shape[0] <= 8:
        return np.stack([a[g] @ b[g] for g in range(a.shape[0])])
    return np.matmul(a, b)
