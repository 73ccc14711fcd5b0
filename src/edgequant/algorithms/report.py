"""What one recovery algorithm did, in the summary's words."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepReport:
    """``name``: the algorithm; ``layers``: how many it changed; ``measure``: what ``before``
    and ``after`` count (lower is better), e.g. "mean |output error|"; ``seconds``: its wall
    time; ``detail``: anything else worth a user's eye (runs, iterations, skipped layers)."""

    name: str
    layers: int
    measure: str
    before: float
    after: float
    seconds: float
    detail: str = ""
    unit: str = "layers"

    def line(self) -> str:
        """``AdaRound: 54 layers, layer MSE −63 % on average, 212 s``."""
        change = ""
        if self.before > 0:
            change = f", {self.measure} {100.0 * (self.after - self.before) / self.before:+.0f} %"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.name}: {self.layers} {self.unit}{change}, {self.seconds:.1f} s{extra}"
