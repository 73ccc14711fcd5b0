"""The collapse guard: when the quantized outputs fall far from float, name the layers to blame
and the exact flags that fix it."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgequant.mixed.sensitivity import sensitivity


@dataclass(frozen=True)
class Collapse:
    """The quantized model's worst output cosine, the most sensitive layers, and fixes."""

    cosine: float
    threshold: float
    layers: tuple[str, ...]
    overrides: tuple[str, ...] = field(default=())

    def advice(self) -> str:
        flags = " ".join(f"--override '{o}'" for o in self.overrides)
        return (f"rerun with --auto-mixed (automatic 16-bit fallback), or keep the worst layers in higher "
                f"precision: {flags}" if flags else "rerun with --auto-mixed (automatic 16-bit fallback)")


def collapse_report(state, result, progress=None, top: int = 5) -> Collapse:
    """Rank layers on the held-out samples and suggest overrides for the worst ``top``."""
    from edgequant.analysis.analyze import suggest_overrides
    from edgequant.targets import get_target

    can_float = "float" in get_target(state.opts.target).fallback
    sens = sensitivity(state, result.model, progress)
    overrides = tuple(suggest_overrides(sens.ranked()[:top], "int16", can_float))
    cosine = min(f.cosine for f in result.summary.fidelity)
    layers = tuple(o.rpartition("=")[0] for o in overrides)
    return Collapse(cosine, state.opts.collapse_cosine, layers, overrides)
