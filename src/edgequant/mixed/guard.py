"""The collapse guard: when the quantized outputs fall far from float, name the layers to blame
and the exact overrides that fix it."""

from __future__ import annotations

from edgequant.analysis.analyze import suggest_overrides
from edgequant.calibrated import CalibratedModel
from edgequant.mixed.sensitivity import sensitivity
from edgequant.quant.dtypes import QuantDType
from edgequant.result import Collapse, QuantizeResult
from edgequant.targets import get_target

__all__ = ["Collapse", "collapse_report"]


def collapse_report(state: CalibratedModel, result: QuantizeResult, progress=None, top: int = 5) -> Collapse:
    """Rank layers on the held-out samples and suggest overrides for the worst ``top``."""
    can_float = "float" in get_target(state.options.target).fallback
    sens = sensitivity(state, result.model, progress)
    overrides = tuple(suggest_overrides(sens.ranked()[:top], QuantDType.INT16, can_float))
    cosine = min(f.cosine for f in result.summary.fidelity)
    layers = tuple(str(o.selector) for o in overrides)
    return Collapse(cosine, state.options.collapse_cosine, layers, overrides, recovery_flags(state.options))


def recovery_flags(options) -> str:
    """The recovery switches worth trying before any layer leaves its bits, or "" when the run
    used recovery already: bias correction, with CLE for per-tensor weights and GPTQ for 4-bit ones."""
    if options.recovery:
        return ""
    flags = ["--cle"] if not options.per_channel else []
    flags += ["--bias-correction"] + (["--gptq"] if options.weight_dtype.bits == 4 else [])
    return " ".join(flags)
