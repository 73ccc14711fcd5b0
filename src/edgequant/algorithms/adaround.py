"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

For fixed scale ``s`` and zero point ``z`` each weight is rounded down or up, learned by
gradient descent on a continuous relaxation::

    W_soft = s · (clip(floor(W / s) + h(V) + z, qmin, qmax) − z)
    h(V)   = clip(sigmoid(V) · (ζ − γ) + γ, 0, 1)                 ζ = 1.1, γ = −0.1
    loss   = mean_r ‖P_r · W_softᵀ − T_r‖² + λ · Σ (1 − |2 h(V) − 1|^β)

``P_r`` are patch rows of the layer input (as the partially quantized model feeds the layer),
``T_r`` the float layer output (float inputs, float weight, no bias) at the same rows; the
squared norm sums over output channels. ``V`` starts where ``h(V)`` equals the fractional part
of ``W / s`` (so ``W_soft = W`` inside the range). The regulariser is off for the first
``warmup`` fraction of steps, then β decays from 20 to 2 by a cosine (as AIMET does), pushing
every ``h`` to 0 or 1. The result rounds up where ``h(V) ≥ 0.5``.

Worked example: W / s = 2.3 starts at h = 0.3 (V = logit((0.3 + 0.1) / 1.2) ≈ −0.69); it ends
as 2 or 3, whichever the layer output prefers, where nearest rounding would always give 2.

PyTorch is imported only inside ``adaround``; importing this module needs numpy alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgequant.algorithms.layer import Layer, quant_range
from edgequant.errors import ConfigError
from edgequant.quant.params import QuantParams, Scheme, round_values

if TYPE_CHECKING:
    import torch

ZETA, GAMMA = 1.1, -0.1
#: Most values of kept patch rows (G · rows · I_g); 2^25 float32 values are 128 MiB.
ROW_BUDGET = 1 << 25


@dataclass(frozen=True)
class AdaRoundOptions:
    """Options of ``adaround`` (NeuroPilot names in brackets).

    * ``steps`` (``adaround_optim_steps``) and ``batch_size`` (``adaround_batch_size``, patch
      rows per step): 1000 × 256 reaches most of the gain of AIMET's 10000 steps at a tenth of
      the time (about 0.5-4 s for a MobileNet-size layer on one thread);
    * ``lr`` (``optim_lr``): Adam learning rate on V; 1e-2 because V must travel ~±2.4 (h from
      0 to 1) within 1000 steps (AIMET's 1e-3 assumes 10000 steps);
    * ``data_count`` (``adaround_data_count``): only the first samples of ``x``/``target``;
    * ``reg_weight`` λ, ``beta`` (start, end), ``warmup`` fraction without regulariser;
    * ``max_rows``: patch rows kept (sampled once, seeded), also limited to ``ROW_BUDGET``
      values; ``seed`` drives that sample and the per-step batches.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-2
    data_count: int | None = None
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    seed: int = 0
    max_rows: int = 1 << 17

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_rows < 1:
            raise ConfigError(f"AdaRound steps {self.steps}, batch_size {self.batch_size} and max_rows "
                              f"{self.max_rows} must be at least 1")
        if not self.lr > 0 or self.reg_weight < 0:
            raise ConfigError(f"AdaRound lr {self.lr} must be positive and reg_weight {self.reg_weight} ≥ 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"AdaRound warmup {self.warmup} must be a fraction in [0, 1)")
        if self.data_count is not None and self.data_count < 1:
            raise ConfigError(f"AdaRound data_count {self.data_count} must be at least 1 (or None for all)")


@dataclass(frozen=True)
class AdaRoundStats:
    """Layer output MSE (mean over kept rows and output channels) with nearest rounding
    (``mse_before``) and with the learned rounding (``mse_after``), the steps run, the wall
    time and the patch rows kept."""

    mse_before: float
    mse_after: float
    steps: int
    seconds: float
    rows: int


def import_torch() -> Any:
    from edgequant.frontends.torch import import_torch as required

    return required("AdaRound and block reconstruction")


@contextlib.contextmanager
def one_thread(torch: Any) -> Iterator[None]:
    """PyTorch on one thread while inside (restored after): the same bytes on any machine (a
    reduction's order follows the thread count) and, on 2 busy cores, 4× faster than 2 threads
    (block reconstruction of the MNIST CNN: 35 ms a step against 150)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def beta_at(step: int, options: AdaRoundOptions) -> float | None:
    """β of the regulariser at ``step`` (None during warm-up): cosine from start to end.

    Example: 1000 steps, warm-up 0.2, β (20, 2): step 100 → None, 200 → 20, 600 → 11, 1000 → 2.
    """
    start = int(options.warmup * options.steps)
    if step < start:
        return None
    rel = (step - start) / max(1, options.steps - start)
    hi, lo = options.beta
    return lo + 0.5 * (hi - lo) * (1 + math.cos(rel * math.pi))


def _kept_rows(layer: Layer, x: np.ndarray, target: np.ndarray,
               options: AdaRoundOptions) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of at most ``max_rows`` patch rows (sorted) and the target rows at them,
    as [G, R', I_g] and [G, R', O_g] float32; nothing larger is materialised."""
    total = layer.row_count(x)
    if total == 0:
        raise ConfigError("AdaRound needs at least one input row; got an empty input")
    g, o_g, i_g = layer.matrix().shape
    keep = min(total, options.max_rows, max(1, ROW_BUDGET // (g * i_g)))
    rows = np.arange(total)
    if keep < total:
        rows = np.sort(np.random.default_rng(options.seed).choice(total, keep, replace=False))
    p = layer.patch_rows(x, rows).astype(np.float32)
    t = layer.output_rows(target, rows).astype(np.float32)
    if t.shape != (g, keep, o_g):
        raise ConfigError(f"AdaRound target of shape {target.shape} does not match the layer output "
                          f"for input {x.shape} (expected {g * o_g} channels)")
    return np.ascontiguousarray(p), np.ascontiguousarray(t)


def _mse(torch: Any, p: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> float:
    """Mean of (P · Wᵀ − T)² over rows and output channels; ``p``/``t`` rows first
    ([R, G, I_g], [R, G, O_g]), in chunks of rows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, p.shape[0], 4096):
            out = torch.bmm(p[start:start + 4096].transpose(0, 1), w.transpose(1, 2))
            total += float(((out - t[start:start + 4096].transpose(0, 1)) ** 2).sum())
            count += out.numel()
    return total / max(1, count)


def _h(torch: Any, v: torch.Tensor) -> torch.Tensor:
    """The rectified sigmoid ``clip(sigmoid(V) · (ζ − γ) + γ, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _optimise(torch: Any, tensors: dict[str, Any], options: AdaRoundOptions,
              progress: Callable[[int, int], None] | None) -> Any:
    """Adam on V; returns the final V. ``tensors``: p, t (rows first), base, slope, v with
    ``W_soft = base + slope · h(V)`` (the clip folded in: slope is 0 where it binds)."""
    p, t, base, slope = (tensors[k] for k in ("p", "t", "base", "slope"))
    v = tensors["v"].clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=options.lr, fused=True)  # one kernel per step on CPU
    gen = torch.Generator().manual_seed(options.seed)
    rows = p.shape[0]
    for step in range(options.steps):
        batch = torch.randint(rows, (min(options.batch_size, rows),), generator=gen)
        h = _h(torch, v)
        out = torch.bmm(p.index_select(0, batch).transpose(0, 1), torch.addcmul(base, slope, h).transpose(1, 2))
        loss = ((out - t.index_select(0, batch).transpose(0, 1)) ** 2).sum() / batch.numel()
        beta = beta_at(step, options)
        if beta is not None and options.reg_weight > 0:  # Σ(1 − |2h − 1|^β) without its constant
            loss = loss - options.reg_weight * (2 * h - 1).abs().pow(beta).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and ((step + 1) % 100 == 0 or step + 1 == options.steps):
            progress(step + 1, options.steps)
    return v.detach()


def adaround(layer: Layer, params: QuantParams, scheme: Scheme, x: np.ndarray, target: np.ndarray,
             options: AdaRoundOptions = AdaRoundOptions(),
             progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, AdaRoundStats]:
    """Learned rounding of ``layer.weight`` for the fixed ``params``.

    ``x``: the layer input as the partially quantized model feeds it, ``target``: the float
    layer output on float inputs without bias, both in ONNX layout and sample-aligned along the
    first axis (Conv [N, C, H, W] → [N, O, H', W']; Gemm [M, K] → [M, N]; MatMul [..., K] →
    [..., N]). Returns the integer weight (shape/dtype of ``quantize_array``) and statistics;
    ``progress(step, steps)`` is called every 100 steps. Deterministic for a given seed (on
    one thread, ``one_thread``).
    """
    torch = import_torch()
    with one_thread(torch):
        return _adaround(torch, layer, params, scheme, x, target, options, progress)


def _adaround(torch: Any, layer: Layer, params: QuantParams, scheme: Scheme, x: np.ndarray, target: np.ndarray,
              options: AdaRoundOptions, progress: Callable[[int, int], None] | None) -> tuple[np.ndarray, AdaRoundStats]:
    began = time.perf_counter()
    if options.data_count is not None:
        x, target = x[: options.data_count], target[: options.data_count]
    p, t = _kept_rows(layer, x, target, options)
    s, z = layer.row_params(params)
    lo, hi = quant_range(params, scheme)
    scaled = layer.matrix().astype(np.float64) / s
    floor = np.floor(scaled)
    frac = np.clip(scaled - floor, 0.0, 1.0)
    v0 = -np.log((ZETA - GAMMA) / (frac - GAMMA) - 1)  # h(v0) = frac
    nearest = np.clip(round_values(scaled, scheme.rounding) + z, lo, hi)
    free = (floor + z >= lo) & (floor + z <= hi - 1)  # where clip(floor + h + z) moves with h

    def f32(a: np.ndarray) -> Any:
        return torch.from_numpy(np.array(a, dtype=np.float32, order="C"))  # a writable copy

    tensors = {"p": f32(p.transpose(1, 0, 2)), "t": f32(t.transpose(1, 0, 2)), "v": f32(v0),
               "base": f32(s * (np.clip(floor + z, lo, hi) - z)), "slope": f32(s * free)}
    before = _mse(torch, tensors["p"], tensors["t"], f32(s * (nearest - z)))
    v = _optimise(torch, tensors, options, progress)
    q = np.clip(floor + (_h(torch, v).numpy() >= 0.5) + z, lo, hi)
    after = _mse(torch, tensors["p"], tensors["t"], f32(s * (q - z)))
    stats = AdaRoundStats(before, after, options.steps, time.perf_counter() - began, p.shape[1])
    return layer.from_matrix(q).astype(params.dtype.np_dtype), stats
