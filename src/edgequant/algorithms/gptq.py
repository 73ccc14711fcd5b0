"""GPTQ-style rounding (Frantar et al. 2022, "GPTQ"; OBQ before it) for fixed scales.

The layer error for a weight row ``w`` quantized to ``q`` on inputs ``X`` (patch rows) is
``‖X (w − q)‖² = (w − q)ᵀ (XᵀX) (w − q)``. GPTQ quantizes one input column ``i`` at a time,
to the nearest level ``q_i = s · (clip(round(w_i / s) + z, qmin, qmax) − z)``, and moves the
error onto the columns not yet quantized, using the upper Cholesky factor ``U`` of ``H⁻¹``
(``H⁻¹ = Uᵀ U``, ``H = 2 XᵀX / R + λ I``)::

    e = (w_i − q_i) / U[i, i]          w_j ← w_j − e · U[i, j]     for j > i

Updates inside a block of ``block_size`` columns are immediate; those to later columns are
applied once per block as a matrix product (the "lazy batch" trick). Scales and zero points are
never changed; only which integer each weight rounds to.

Worked example: two perfectly correlated inputs (x₁ = x₂) and weights (0.4, 0.4) with s = 1:
nearest rounding gives (0, 0) and output error 0.8·x; GPTQ rounds w₁ to 0, moves its error to
w₂ = 0.8, which rounds to 1: output error 0.2·x.

Upstream error (asymmetric target, as in GPTAQ, Li et al. 2025): the layer's inputs ``X_q`` come
from the partially quantized model, while what it should reproduce is the float output
``X_f wᵀ``. With the float inputs given, the weight GPTQ rounds is first moved to the
least-squares answer ``w* = argmin ‖X_q w*ᵀ − X_f wᵀ‖² + λ‖w* − w‖²``, that is
``w* = w (X_fᵀX_q + λ'I)(X_qᵀX_q + λ'I)⁻¹``. Since ``X_q w*ᵀ`` is then the projection of the
target onto what ``X_q`` can express, ``‖X_q qᵀ − X_f wᵀ‖² = ‖X_q (q − w*)ᵀ‖² + const``, and
GPTQ on ``w*`` with the same ``H`` minimises the error against the float output. A fit on
few rows per input overfits, so GPTQ steps only part of the way from ``w`` to ``w*``, per output
row as far as the last quarter of the samples, held out of the fit, confirms (``_aimed``).

Dead inputs (a column that is always 0: ``H[i, i] = 0``) get the mean live diagonal, so they
round to nearest and pass no error on. Dampening ``λ = stability_ratio · mean(diag H)``
(NeuroPilot ``hessian_opt_stability_ratio``) keeps ``H`` invertible; if the factorization
still fails, λ grows tenfold (up to four times).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgequant.algorithms.layer import Layer, group_matmul, quant_range
from edgequant.errors import ConfigError
from edgequant.quant.params import QuantParams, Scheme, round_values


@dataclass(frozen=True)
class GPTQOptions:
    """Options of ``gptq_round`` (NeuroPilot names in brackets).

    * ``block_size`` (``hessian_opt_block_size``): columns per lazy block update;
    * ``stability_ratio`` (``hessian_opt_stability_ratio``): dampening as a fraction of
      mean(diag H);
    * ``sort_hessian`` (``hessian_opt_sort_hessian``): quantize the columns with the largest
      Hessian diagonal (most sensitive inputs) first, while most columns remain to absorb error;
    * ``fast`` (``hessian_opt_use_fast_strategy``): H from a seeded subsample of
      ``max(fast_rows, 8 · I_g)`` patch rows and float32 arithmetic instead of float64 (about
      2-10× faster on large feature maps; the result is then a little noisier);
    * ``data_count`` (``hessian_opt_data_count``): use only the first ``data_count`` samples
      (first axis of ``x``); None uses them all;
    * ``seed``: the row subsample of the fast strategy.
    """

    block_size: int = 128
    stability_ratio: float = 0.01
    sort_hessian: bool = True
    fast: bool = False
    data_count: int | None = None
    fast_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"GPTQ block_size {self.block_size} must be at least 1")
        if not self.stability_ratio > 0:
            raise ConfigError(f"GPTQ stability_ratio {self.stability_ratio} must be positive (e.g. 0.01)")
        if self.data_count is not None and self.data_count < 1:
            raise ConfigError(f"GPTQ data_count {self.data_count} must be at least 1 (or None for all)")
        if self.fast_rows < 1:
            raise ConfigError(f"GPTQ fast_rows {self.fast_rows} must be at least 1")


def hessian(layer: Layer, x: np.ndarray, options: GPTQOptions = GPTQOptions()) -> np.ndarray:
    """``H = 2 XᵀX / R`` per group, [G, I_g, I_g], from the patch rows of ``x`` (ONNX layout:
    Conv [N, C, *S], Gemm [M, K], MatMul [..., K]), accumulated over chunks of rows (float64;
    the fast strategy: a row subsample in float32).

    Example: a Gemm with x = [[1, 2]] (one row) has H = 2·[[1, 2], [2, 4]].
    """
    if options.data_count is not None:
        x = x[: options.data_count]
    g, _, i_g = layer.matrix().shape
    total = layer.row_count(x)
    if total == 0:
        raise ConfigError("GPTQ needs at least one input row; got an empty input")
    if options.fast:
        keep = min(total, max(options.fast_rows, 8 * i_g))
        rows = np.sort(np.random.default_rng(options.seed).choice(total, keep, replace=False))
        p = layer.patch_rows(x, rows).astype(np.float32)
        return (2.0 / keep) * _gram(p).astype(np.float64)
    h = np.zeros((g, i_g, i_g))
    for chunk in layer.iter_patches(x):
        h += _gram(chunk.astype(np.float64))
    return h * (2.0 / total)


def cross_gram(layer: Layer, x: np.ndarray, x_float: np.ndarray, options: GPTQOptions = GPTQOptions()) -> np.ndarray:
    """``2 X_fᵀX_q / R`` per group, [G, I_g, I_g] (float64), from the patch rows of the float
    inputs ``x_float`` and the quantized-model inputs ``x`` (same shape, row for row), the same
    rows as ``hessian`` uses."""
    if x_float.shape != x.shape:
        raise ConfigError(f"GPTQ float inputs of shape {x_float.shape} do not match the inputs {x.shape}")
    if options.data_count is not None:
        x, x_float = x[: options.data_count], x_float[: options.data_count]
    total = layer.row_count(x)
    if options.fast:
        keep = min(total, max(options.fast_rows, 8 * layer.matrix().shape[2]))
        rows = np.sort(np.random.default_rng(options.seed).choice(total, keep, replace=False))
        pq, pf = layer.patch_rows(x, rows).astype(np.float32), layer.patch_rows(x_float, rows).astype(np.float32)
        return (2.0 / keep) * np.stack([pf[g].T @ pq[g] for g in range(pq.shape[0])]).astype(np.float64)
    g, _, i_g = layer.matrix().shape
    c = np.zeros((g, i_g, i_g))
    for pq, pf in zip(layer.iter_patches(x), layer.iter_patches(x_float)):
        pq, pf = pq.astype(np.float64), pf.astype(np.float64)
        c += np.stack([pf[k].T @ pq[k] for k in range(g)])
    return c * (2.0 / total)


def float_target_weight(w: np.ndarray, h: np.ndarray, c: np.ndarray, ratio: float) -> np.ndarray:
    """``w* = w (C + λI)(H + λI)⁻¹`` per group (``w`` [G, O_g, I_g], ``H = 2 X_qᵀX_q / R``,
    ``C = 2 X_fᵀX_q / R``, ``λ = ratio · mean(diag H)``, dead inputs as in ``_damped``): the
    weight whose output on the quantized-model inputs is closest to the float layer's output.

    Example: X_q = 2 X_f (an upstream layer doubled its output) gives C = H / 2 and, without
    damping, w* = w / 2.
    """
    hd = _damped(h, ratio)
    lam = hd - h  # the damping (and dead-input fill) that _damped added, on the diagonal
    rhs = np.einsum("goi,gij->goj", w, c + lam)
    # w* hd = rhs  ⇔  hd w*ᵀ = rhsᵀ (hd symmetric)
    return np.linalg.solve(hd, rhs.transpose(0, 2, 1)).transpose(0, 2, 1)


def _gram(p: np.ndarray) -> np.ndarray:
    """``PᵀP`` per group, one 2-D BLAS product each (numpy's batched matmul can be 100× slower
    on [1, R, I] arrays)."""
    return np.stack([p[g].T @ p[g] for g in range(p.shape[0])])


def _damped(h: np.ndarray, ratio: float) -> np.ndarray:
    """Dead inputs (diag 0) get the group's mean live diagonal (1 when all are dead); then
    ``λ = ratio · mean(diag H)`` is added to the diagonal. Returns a new array.

    Example: diag (4, 0, 2) with ratio 0.01 → (4, 3, 2) → (4.03, 3.03, 2.03).
    """
    h = h.copy()
    diag = np.diagonal(h, axis1=1, axis2=2).copy()
    dead = diag <= 0
    live_sum = np.where(dead, 0.0, diag).sum(axis=1, keepdims=True)
    count = np.maximum((~dead).sum(axis=1, keepdims=True), 1)
    diag = np.where(dead, np.where(live_sum > 0, live_sum / count, 1.0), diag)
    idx = np.arange(h.shape[1])
    h[:, idx, idx] = diag + ratio * diag.mean(axis=1, keepdims=True)
    return h


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper factor ``U`` with ``H⁻¹ = Uᵀ U`` per group; retries with λ × 10 on failure."""
    eye = np.eye(h.shape[1])
    extra = 0.0
    for _ in range(5):
        try:
            a = h + extra * eye
            return np.linalg.cholesky(np.linalg.inv(a)).transpose(0, 2, 1)
        except np.linalg.LinAlgError:
            extra = 10 * max(extra, float(np.diagonal(h, axis1=1, axis2=2).mean()) * 0.01)
    raise ConfigError("GPTQ: the input Hessian is not positive definite even with 10000× "
                      "dampening; raise stability_ratio or check the inputs for NaN")


def _nearest(w: np.ndarray, s: np.ndarray, z: np.ndarray, bounds: tuple[int, int], rounding: str) -> np.ndarray:
    """Integer levels ``clip(round(w / s) + z, qmin, qmax)`` (as floats)."""
    return np.clip(round_values(w / s, rounding) + z, bounds[0], bounds[1])


def _columns(w: np.ndarray, u: np.ndarray, s: np.ndarray, z: np.ndarray, bounds: tuple[int, int],
             rounding: str, block: int) -> np.ndarray:
    """The GPTQ column loop on [G, O_g, I] weights (columns already in processing order);
    ``s``/``z`` broadcast as [G, O_g, 1] or scalars. Returns integer levels [G, O_g, I]."""
    w = w.copy()
    q = np.empty_like(w)
    sc, zc = s[..., 0] if s.ndim else s, z[..., 0] if z.ndim else z
    n = w.shape[2]
    for i1 in range(0, n, block):
        i2 = min(n, i1 + block)
        err = np.empty((w.shape[0], w.shape[1], i2 - i1), dtype=w.dtype)
        for i in range(i1, i2):
            col = w[:, :, i]
            q[:, :, i] = _nearest(col, sc, zc, bounds, rounding)
            e = (col - sc * (q[:, :, i] - zc)) / u[:, None, i, i]
            w[:, :, i + 1:i2] -= e[:, :, None] * u[:, None, i, i + 1:i2]
            err[:, :, i - i1] = e
        if i2 < n:
            w[:, :, i2:] -= group_matmul(err, u[:, i1:i2, i2:])
    return q


#: Share of the samples (first axis) that checks how far the float-target weight is trusted.
HELD_OUT = 0.25


def _aimed(layer: Layer, w: np.ndarray, x: np.ndarray, x_float: np.ndarray,
           options: GPTQOptions) -> tuple[np.ndarray, np.ndarray]:
    """(H of all of ``x``, the weight GPTQ rounds): ``w + α (w* − w)`` per output row, ``w*``
    the float-target weight (``float_target_weight``) of all the samples and ``α`` in [0, 1]
    the step towards it that minimises the error against the float output on the last
    ``HELD_OUT`` of the samples, for the ``w*`` fitted on the others (a least-squares fit on
    few rows per input overfits: MiniLM's 1536-input layers from 64 sentences)."""
    if x_float.shape != x.shape:
        raise ConfigError(f"GPTQ float inputs of shape {x_float.shape} do not match the inputs {x.shape}")
    if options.data_count is not None:
        x, x_float = x[: options.data_count], x_float[: options.data_count]
    every = dataclasses.replace(options, data_count=None)
    n = x.shape[0]
    k = n - max(1, int(round(n * HELD_OUT))) if n >= 4 else n
    parts = [(x[:k], x_float[:k]), (x[k:], x_float[k:])] if k < n else [(x, x_float)]
    grams = [(hessian(layer, a, every), cross_gram(layer, a, b, every), layer.row_count(a)) for a, b in parts]
    rows = sum(r for _, _, r in grams)
    h, c = np.zeros_like(grams[0][0]), np.zeros_like(grams[0][1])
    for hg, cg, r in grams:
        h += hg * (r / rows)
        c += cg * (r / rows)
    step = float_target_weight(w, h, c, options.stability_ratio) - w
    if len(grams) == 1:
        return h, w + step
    h_fit, c_fit, _ = grams[0]
    h_val, c_val, _ = grams[1]
    d = float_target_weight(w, h_fit, c_fit, options.stability_ratio) - w
    # held-out error of w + α d: ‖A + α B‖² with A = X_q wᵀ − X_f wᵀ, B = X_q dᵀ, per output row
    m = h_val - c_val  # (X_qᵀX_q − X_fᵀX_q), up to the common factor 2/R
    cross = np.sum(w * np.einsum("goj,gij->goi", d, m), axis=2)
    norm = np.sum(d * np.einsum("goj,gji->goi", d, h_val), axis=2)
    alpha = np.clip(np.where(norm > 0, -cross / np.where(norm > 0, norm, 1.0), 0.0), 0.0, 1.0)
    return h, w + alpha[..., None] * step


def gptq_round(layer: Layer, params: QuantParams, scheme: Scheme, x: np.ndarray,
               options: GPTQOptions = GPTQOptions(), x_float: np.ndarray | None = None) -> np.ndarray:
    """The integer weight (shape and dtype of ``quantize_array(layer.weight, params, scheme)``)
    that GPTQ picks for the fixed ``params`` on the layer inputs ``x`` (ONNX layout). With
    ``x_float`` (the float model's inputs of the layer on the same samples, shaped like ``x``)
    it aims at the float output rather than at the float weight on ``x`` (module docstring).

    Respects qmin/qmax (narrow range), zero points, per-tensor or per-output-channel params and
    the scheme's rounding mode for each nearest rounding.
    """
    dtype = np.float32 if options.fast else np.float64
    w = layer.matrix().astype(np.float64)
    if x_float is None:
        raw = hessian(layer, x, options)
    else:
        raw, w = _aimed(layer, w, x, x_float, options)
    h = _damped(raw, options.stability_ratio)
    w = w.astype(dtype)
    s, z = (a.astype(dtype) for a in layer.row_params(params))
    order = None
    if options.sort_hessian:
        order = np.argsort(-np.diagonal(h, axis1=1, axis2=2), axis=1, kind="stable")  # [G, I]
        w = np.take_along_axis(w, order[:, None, :], axis=2)
        h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    u = _inverse_cholesky(h).astype(dtype)
    q = _columns(w, u, s, z, quant_range(params, scheme), scheme.rounding, options.block_size)
    if order is not None:
        back = np.empty_like(q)
        np.put_along_axis(back, order[:, None, :], q, axis=2)
        q = back
    return layer.from_matrix(q).astype(params.dtype.np_dtype)
