"""The default repair: when the guard finds the quantized model broken, fix it before it is
written, instead of writing the broken model with a warning.

1. **Recovery** (every layer keeps its bits), where the weights' rounding is what breaks:
   per-tensor or 4-bit weights, or a target that runs no 16-bit or float layers. The state
   is calibrated again with the algorithms ``recovery_for`` picks (empirical bias correction;
   CLE for per-tensor weights; GPTQ for 4-bit ones), or the user's own recovery, at the opset
   a 16-bit fallback needs. If the guard is then quiet, that model is the result.
   Per-channel int8 weights round finely: their collapses come from activations (layer-norm
   statistics, attention), which recovery does not touch. There it costs time and can cost
   accuracy (PP-OCRv4: bias correction 163 s against 4 s, exact lines 0.86 → 0.81), so the
   repair goes to the activations' ranges instead:
1b. **Unclipped ranges**: the state is calibrated again with ``minmax`` (unless it was
   already). Percentile clipping cuts the systematic outlier channels a transformer's
   residual stream carries; PP-OCRv4 reads 0.86 of its lines percentile-calibrated and every
   one with minmax, at plain int8's cost and latency. Where the guard is then quiet, that
   model is the result. (Minmax is not the default: it costs 0.5-2 pt on the zoo's healthy
   CNNs and audio models.)
2. **Mixed precision**: the search (``search_mixed``, default target and 10 % MAC budget)
   moves the fewest, cheapest layers to the fallback ``fallback_for`` picks: float for
   onnxruntime on a host, int16 for NPUs (they run it; float goes to their CPU). Targets
   with neither keep step 1's result.

The result with the best held-out fidelity wins (``health``; the plain one if no step
helped; at equal decisions, the one with more 8-bit MACs whose cosine clears the guard's
floor: ``better``), and ``Summary.repair`` says what was tried and what each step measured.
``repair=False`` (``--no-repair``) keeps the plain result and the guard's warning.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from edgequant.calibrated import CalibratedModel
from edgequant.calibration.method import Method
from edgequant.ir.model import opset_of
from edgequant.result import OutputFidelity, QuantizeResult
from edgequant.targets import get_target, repair_fallback

Progress = Callable[[str, int, int], None]
#: Re-calibrates with new options: ``(options, min_opset) -> CalibratedModel`` (api.calibrate
#: on the same model and calibration source).
Recalibrate = Callable[..., CalibratedModel]


def fallback_for(target: str) -> str | None:
    """The precision the repair's search moves layers to on ``target`` (``targets.repair_fallback``)."""
    return repair_fallback(get_target(target))


def health(fidelity: list[OutputFidelity]) -> tuple[float, float]:
    """A sort key, higher is healthier: (the worst decision share, the worst cosine)."""
    decided = [f.sequences if f.sequences is not None else f.decisions for f in fidelity
               if f.decisions is not None]
    decided += [1.0 - f.flips for f in fidelity if f.flips is not None]
    cosines = [f.cosine if f.cosine == f.cosine else -1.0 for f in fidelity]
    return (min(decided, default=1.0), min(cosines, default=1.0))


def _eight_bit_share(result: QuantizeResult) -> float | None:
    macs = result.summary.eight_bit_macs
    return macs[0] / macs[1] if macs and macs[1] else None


def better(candidate: QuantizeResult, best: QuantizeResult, cosine_floor: float) -> bool:
    """Is ``candidate`` healthier than ``best`` (``health``)? Where outputs decide something
    and both keep the same share of decisions, the one with more MACs 8-bit × 8-bit wins if its
    worst cosine clears the guard's floor: the decisions are the task, and it is the model the
    target runs fastest (PP-OCRv4, 12 held-out lines: minmax and mixed precision each decode 10
    as float does; minmax reads 0.987 of the test lines at plain int8's latency, mixed
    precision 0.983, 1.3× slower). Otherwise the cosine decides.

    Before all that, a result the guard passes beats one it finds broken: on MediaPipe's hand
    landmarks the mixed-precision result (worst cosine 0.988, one confident score flipped:
    1 − F1 0.053, where the guard counts from 3 flips) lost on decisions to the plain one,
    which keeps every score at cosine 0.791, and the broken model was written."""
    from edgequant.mixed.guard import judge

    passes = not judge(candidate.summary.fidelity, cosine_floor)
    if passes != (not judge(best.summary.fidelity, cosine_floor)):
        return passes
    hc, hb = health(candidate.summary.fidelity), health(best.summary.fidelity)
    decides = any(f.decisions is not None or f.flips is not None for f in candidate.summary.fidelity)
    sc, sb = _eight_bit_share(candidate), _eight_bit_share(best)
    if decides and hc[0] == hb[0] and sc is not None and sb is not None and sc != sb:
        cheaper = hc if sc > sb else hb
        if cheaper[1] >= cosine_floor:
            return sc > sb
    return hc > hb


def _fidelity(result: QuantizeResult) -> str:
    f = result.summary.fidelity
    worst = min(f, key=lambda x: x.cosine)
    text = f"cosine {worst.cosine:.4f}"
    shares = [x.decisions for x in f if x.decisions is not None and x.sequences is None]
    sequences = [x.sequences for x in f if x.sequences is not None]
    flips = [x.flips for x in f if x.flips is not None]
    if sequences:
        text += f", {min(sequences):.0%} of samples decode as float does"
    if shares:
        text += f", {min(shares):.0%} of samples keep their decisions"
    if flips:
        text += f", confident scores 1 − F1 {max(flips):.3f}"
    return text


def repair(state: CalibratedModel, first: QuantizeResult, recalibrate: Recalibrate,
           progress: Progress | None = None, exports: tuple[str, ...] = ()) -> QuantizeResult:
    """The best of ``first`` (broken: its summary holds the guard's finding), its recovered
    form and the mixed-precision search on that; see the module doc. ``exports``: parameter
    files to be written, whose formats limit the recovery (``exportable_recovery``)."""
    from edgequant.export import exportable_recovery
    from edgequant.mixed.guard import collapse_report
    from edgequant.mixed.search import MixedOptions, recovery_for, search_mixed
    from edgequant.pipeline import finish

    t0 = time.perf_counter()
    opts = state.options
    reason = first.summary.collapse.reason if first.summary.collapse else ""
    lines = [f"the plain result is broken ({reason}); repaired before writing (--no-repair keeps it)"]
    fallback = fallback_for(opts.target)
    min_opset = 21 if fallback == "int16" else 0
    best, best_state, chosen = first, state, "plain"
    if rounding_bound(opts, fallback):
        recovery = opts.recovery if opts.recovery else exportable_recovery(recovery_for(opts), exports)
        base = recalibrate(dataclasses.replace(opts, recovery=recovery), min_opset)
        second = finish(base, progress=progress, rank=False)
        if better(second, first, opts.collapse_cosine):
            best, best_state, chosen = second, base, "recovered"
        done = ", ".join(s.name for s in second.summary.recovery) or "nothing applies"
        lines.append(f"recovery ({done}): {_fidelity(second)}" + ("" if second.summary.collapse else ", guard quiet"))
        broken = second.summary.collapse is not None
    else:
        broken = True
        if opts.method is not Method.MINMAX:
            ranged = recalibrate(dataclasses.replace(opts, method=Method.MINMAX), 0)
            second = finish(ranged, progress=progress, rank=False)
            lines.append(f"activation ranges by minmax (unclipped): {_fidelity(second)}"
                         + ("" if second.summary.collapse else ", guard quiet"))
            if better(second, first, opts.collapse_cosine):
                best, best_state, chosen = second, ranged, "minmax-calibrated"
            broken = second.summary.collapse is not None
        if broken:
            base = state if opset_of(state.model) >= min_opset else recalibrate(opts, min_opset)
    if broken and fallback is not None:
        plan, mixed = search_mixed(base, MixedOptions(fallback=fallback), progress)
        third = finish(base, plan, progress=progress, rank=False)
        lines.append(f"mixed precision: {mixed.describe()}; held out: {_fidelity(third)}")
        if better(third, best, opts.collapse_cosine):
            best, best_state, chosen = third, base, "mixed-precision"
    elif broken:
        lines.append(f"no mixed-precision search: target {opts.target} runs no 16-bit or float layers")
    lines.append(f"kept: the {chosen} result ({time.perf_counter() - t0:.1f} s)")
    if best.summary.collapse is not None:  # still broken: name the layers to blame
        best.summary.collapse = collapse_report(best_state, best, best.summary.collapse.reason, progress)
    best.summary.repair = lines
    best.summary.total_seconds = time.perf_counter() - state.started
    return best


def rounding_bound(options, fallback: str | None) -> bool:
    """Does the repair try recovery first (see the module doc)?"""
    return (bool(options.recovery) or not options.per_channel or options.weight_dtype.bits <= 4
            or fallback is None)
