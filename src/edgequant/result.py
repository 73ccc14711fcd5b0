"""What quantization hands back: the model, its plan, its parameters and a summary."""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from onnx import GraphProto, ModelProto

from edgequant._version import __version__
from edgequant.algorithms.report import StepReport
from edgequant.ir.model import save_model
from edgequant.passes.pipeline import PassResult
from edgequant.planning.options import QuantOptions
from edgequant.planning.overrides import Override
from edgequant.planning.plan import QuantPlan
from edgequant.quant.params import QuantParams


@dataclass(frozen=True)
class OutputFidelity:
    """One output on the held-out samples: cosine and SQNR to float, and for outputs that
    decide something, how often the decision survives (None where the output decides nothing).

    ``decisions``: class-probability outputs (softmax rows), the share of samples whose every
    confident row keeps its top-1 class, and ``row_flips`` the share of confident rows that
    change it; ``flips``: outputs in [0, 1] (sigmoid scores, masks),
    1 − F1 of the confident decisions (float at least 0.1 from 0.5) against float, and
    ``flipped`` how many crossed 0.5; ``sequences``: sequences of class probabilities (a CTC
    recognizer), the share of samples whose greedy-decoded sequence is float's
    (``analysis.metrics.DecisionTally``).
    """

    name: str
    cosine: float
    sqnr_db: float
    decisions: float | None = None
    flips: float | None = None
    flipped: int = 0
    row_flips: float | None = None
    sequences: float | None = None


@dataclass(frozen=True)
class Collapse:
    """The collapse guard's finding: the quantized model's worst output cosine, the most
    sensitive layers, and the overrides that fix it."""

    cosine: float
    threshold: float
    layers: tuple[str, ...]
    overrides: tuple[Override, ...] = field(default=())
    recovery: str = ""  # recovery switches to try first (every layer stays in its bits)
    reason: str = ""  # what the guard saw, e.g. "worst output cosine 0.467 < 0.9"

    def advice(self) -> str:
        flags = " ".join(f"--override '{o}'" for o in self.overrides)
        text = (f"rerun with --auto-mixed (automatic 16-bit fallback), or keep the worst layers in higher "
                f"precision: {flags}" if flags else "rerun with --auto-mixed (automatic 16-bit fallback)")
        if self.recovery:
            text = f"rerun with {self.recovery} (keeps every layer in its bits); else {text}"
        return text


@dataclass
class Summary:
    quantized_ops: dict[str, int]
    float_ops: dict[str, int]
    subgraph_float_ops: int
    calibration_samples: int
    eval_samples: int
    eval_on_calibration: bool
    calibration_seconds: float
    total_seconds: float
    opset: tuple[int, int]
    passes: list[PassResult]
    fidelity: list[OutputFidelity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    precision: dict[str, str] = field(default_factory=dict)  # node → precision set by an override
    collapse: Collapse | None = None
    recovery: list[StepReport] = field(default_factory=list)  # what each recovery algorithm did
    repair: list[str] = field(default_factory=list)  # what the default repair changed, and why
    #: (MACs with both operands 8-bit, all MACs) of the written model's compute ops (mixed.cost)
    eight_bit_macs: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        """The summary as plain JSON values (``--json``): overrides as their text, NaN and
        infinities as null, tuples as lists."""
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    return str(value)


@dataclass
class QuantizeResult:
    """What ``quantize`` returns: the model, its plan, ranges, parameters and a summary."""

    model: ModelProto
    float_model: ModelProto
    plan: QuantPlan
    ranges: dict[str, tuple[float, float]]
    params: dict[str, QuantParams]
    summary: Summary
    options: QuantOptions
    source_graph: GraphProto | None = None  # the user's graph before the passes (ir.graph.outline)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the quantized model atomically."""
        return save_model(self.model, path)


def stamp(model: ModelProto) -> ModelProto:
    """Mark ``model`` as written by this edgequant (producer name and version)."""
    model.producer_name, model.producer_version = "edgequant", __version__
    return model
