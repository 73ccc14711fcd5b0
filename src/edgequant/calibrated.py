"""The calibrated state: one value every stage after calibration reads.

A ``CalibratedModel`` owns the prepared float model, the plan calibration was run for, the
observers, the calibration source and how its samples split into calibration and held-out
samples, and caches of float outputs. From it any plan over the observed tensors is
assembled into a QDQ model without recalibrating (16-bit ranges come from the same
observers), evaluated on the held-out samples, or handed to the layerwise analysis, the
mixed-precision search and the collapse guard. Nothing downstream re-runs the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from onnx import GraphProto, ModelProto

from edgequant.analysis.metrics import DecisionTally, FidelityAccumulator
from edgequant.bodies import Bodies, splice
from edgequant.calibration.observers import MinMaxObserver
from edgequant.data.sources import CalibrationSource, Sample
from edgequant.errors import ConfigError
from edgequant.ir.model import opset_of
from edgequant.passes.pipeline import PassResult
from edgequant.passes.shapes import inferred_shapes
from edgequant.planning.options import QuantOptions
from edgequant.planning.overrides import Override
from edgequant.planning.plan import ActivationPlan, QuantPlan, build_plan
from edgequant.quant.params import QuantParams, compute_params
from edgequant.result import OutputFidelity, stamp
from edgequant.runtime.executor import Executor, executor_for
from edgequant.runtime.feed import run_checked
from edgequant.runtime.session import make_session
from edgequant.transform.qdq import NO_EDITS, Edits, insert_qdq, range_key

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Prepared:
    """A float model made ready to plan: opset upgraded, passes run, nodes named."""

    model: ModelProto
    options: QuantOptions  # per-tensor weights where the opset upgrade they need failed
    passes: list[PassResult]
    from_opset: int
    notes: tuple[str, ...] = ()
    # the user's graph before the passes, without weight data (ir.graph.outline): what a
    # toolchain that reads the original model names its ops after (export.tpu_mlir)
    source: GraphProto | None = None


def activation_params(rng: tuple[float, float], act: ActivationPlan, unsigned_nonnegative: bool = False) -> QuantParams:
    """Scale and zero point of ``act`` for the range ``rng``. With ``unsigned_nonnegative`` a
    symmetric signed tensor that is never negative takes the unsigned type with zero point 0
    (``[0, max]`` in 255 steps, not 127), as TPU-MLIR quantizes a calibrated min ≥ 0."""
    lo, hi = rng
    if unsigned_nonnegative and act.symmetric and act.dtype.signed and lo >= 0:
        return compute_params(0.0, hi, act.dtype.unsigned, False, scheme=act.scheme)
    return compute_params(lo, hi, act.dtype, act.symmetric, scheme=act.scheme)


@dataclass(frozen=True)
class SampleSplit:
    """Samples ``[0, calibration)`` calibrate; ``[calibration, calibration + held_out)`` are
    held out for the fidelity check. With none held out (too few samples), the check runs on
    the first calibration samples and says so."""

    calibration: int
    held_out: int
    eval_limit: int

    @property
    def eval_range(self) -> tuple[int, int]:
        """(first index, count) of the samples the fidelity check uses."""
        if self.held_out == 0:
            return 0, min(self.calibration, self.eval_limit)
        return self.calibration, self.held_out

    def first(self, count: int) -> int:
        """How many of the first ``count`` samples exist (calibration and held-out alike)."""
        return min(count, self.calibration + self.held_out)


_ZERO = np.zeros((), np.float32)


def _shape_views(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero-size stand-ins that keep only each array's shape."""
    return {k: np.broadcast_to(_ZERO, np.shape(v)) for k, v in values.items()}


@dataclass
class CalibratedModel:
    """The prepared model, its plan, its observers and samples (see the module doc)."""

    prepared: Prepared
    plan: QuantPlan
    observers: dict[str, MinMaxObserver]
    source: CalibrationSource
    split: SampleSplit
    calibration_seconds: float
    started: float = field(default_factory=time.perf_counter)
    edits: Edits = NO_EDITS  # weights and biases chosen by accuracy recovery (``algorithms``)
    recovery: tuple = ()  # what each recovery algorithm did (``algorithms.stage.StepReport``)
    reference_model: ModelProto | None = None  # the float model before recovery changed its semantics (ReLU6 → Relu)
    bodies: Bodies = Bodies()  # the quantized If branches and Loop/Scan bodies that stay (edgequant.bodies)
    _references: dict[tuple[int, int], list[Sample]] = field(default_factory=dict, repr=False)
    _shapes: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def model(self) -> ModelProto:
        return self.prepared.model

    @property
    def options(self) -> QuantOptions:
        return self.prepared.options

    def executor(self) -> Executor:
        return executor_for(self.options.workers, self.options.ray_address)

    def plan_with(self, overrides: Iterable[Override]) -> QuantPlan:
        """The plan with ``overrides`` after the options' own (a later one wins)."""
        options = self.options.with_overrides(overrides)
        have = opset_of(self.model)
        if options.required_opset > have:
            raise ConfigError(f"these overrides need opset {options.required_opset} (16-bit or 4-bit types) and the "
                              f"calibrated model is at opset {have}: calibrate with min_opset={options.required_opset}")
        return build_plan(self.model, options, self.prepared.source)

    def ranges(self, plan: QuantPlan, edits: Edits | None = None) -> dict[str, tuple[float, float]]:
        """Each root's range under ``plan``: pinned, learned by recovery (``edits``' ranges,
        the state's own by default) where the plan quantizes the root as it was learned for,
        or from its observer at the root's dtype."""
        learned = (self.edits if edits is None else edits).ranges
        out: dict[str, tuple[float, float]] = {}
        for act in plan.activations.values():
            if act.root not in out:
                out[act.root] = plan.pinned.get(act.root) or learned.get(range_key(act)) \
                    or self.observers[act.root].range(act.dtype, act.symmetric)
        return out

    def params(self, plan: QuantPlan, edits: Edits | None = None) -> dict[str, QuantParams]:
        """One ``QuantParams`` per root tensor of ``plan`` (``edits``: as for ``ranges``)."""
        ranges = self.ranges(plan, edits)
        first: dict[str, ActivationPlan] = {}
        for act in plan.activations.values():
            first.setdefault(act.root, act)
        return {root: activation_params(ranges[root], a, self.options.unsigned_nonnegative) for root, a in first.items()}

    def assemble(self, plan: QuantPlan) -> tuple[ModelProto, dict[str, QuantParams]]:
        """The QDQ model for ``plan`` (whose tensors were all observed) without recalibrating,
        with the weights and biases recovery chose where ``plan`` quantizes them as it did."""
        params = self.params(plan)
        return stamp(splice(insert_qdq(self.model, plan, params, self.edits), self.bodies)), params

    def samples(self, first: int, count: int) -> Iterator[Sample]:
        return self.source.samples(first, first + count)

    def references(self, first: int, count: int) -> list[Sample]:
        """Inputs and float outputs of samples ``[first, first + count)``, computed once (from
        the float model as it was before recovery, where that changed its semantics). The
        first run also fetches what ``tensor_shapes`` needs and shape inference cannot tell."""
        key = (first, count)
        if key not in self._references:
            model = self.reference_model or self.model
            sess = None
            cache = []
            for i, feed in enumerate(self.samples(first, count)):
                if sess is None:
                    extra = self._shape_gaps(feed) if self._shapes is None and model is self.model else []
                    names = [o.name for o in model.graph.output]
                    sess = make_session(model, extra, device=self.options.device)
                values = run_checked(sess, names + (extra if i == 0 else []), feed, first + i)
                if i == 0 and extra:
                    self._shapes = (self._shapes or {}) | _shape_views(dict(zip(extra, values[len(names):])))
                    values = values[: len(names)]
                cache.append({**feed, **{n: np.asarray(v) for n, v in zip(names, values)}})
            self._references[key] = cache
        return self._references[key]

    def _shape_gaps(self, sample: Sample) -> list[str]:
        """Fill ``_shapes`` from shape inference at ``sample``'s input shapes; the compute-op
        tensors it could not tell (to fetch from a run)."""
        from edgequant.ir.graph import initializers
        from edgequant.mixed.cost import OPERANDS, node_macs

        produced = {o for n in self.model.graph.node for o in n.output if o}
        compute = [n for n in self.model.graph.node if n.op_type in OPERANDS]
        wanted = {t for n in compute for t in list(n.input) + list(n.output) if t in produced}
        shapes = _shape_views({k: np.asarray(v) for k, v in sample.items()})
        inferred = inferred_shapes(self.model, {k: np.shape(v) for k, v in sample.items()})
        shapes |= {k: np.broadcast_to(_ZERO, v) for k, v in inferred.items() if k in wanted}
        self._shapes = shapes
        inits = initializers(self.model.graph)
        return list(dict.fromkeys(t for n in compute if not node_macs(n, shapes, inits)
                                  for t in list(n.input) + list(n.output) if t in produced and t not in shapes))

    def tensor_shapes(self) -> dict[str, np.ndarray]:
        """The operands and outputs of the float model's compute ops (``mixed.cost.OPERANDS``)
        on one sample, as zero-size views that keep only the shape (what ``mixed.cost``
        reads): from shape inference, and from the first reference run (or a run of the first
        sample) for what inference cannot tell; computed once."""
        if self._shapes is None:
            sample = next(iter(self.samples(0, 1)), None)
            self._shapes = {}
            if sample is not None:
                gaps = self._shape_gaps(sample)
                if gaps:
                    inputs = [i.name for i in self.model.graph.input]
                    sess = make_session(self.model, gaps, device=self.options.device)
                    got = run_checked(sess, gaps, {k: sample[k] for k in inputs if k in sample}, 0)
                    self._shapes |= _shape_views(dict(zip(gaps, got)))
        return self._shapes

    def evaluate(self, qmodel: ModelProto, progress: Progress | None = None) -> list[OutputFidelity]:
        """Float against quantized outputs on the held-out samples (``split.eval_range``), one
        sample per run (the float outputs are cached per sample)."""
        first, count = self.split.eval_range
        if count == 0:
            return []
        refs = self.references(first, count)
        sess = make_session(qmodel, device=self.options.device)
        names = [o.name for o in sess.get_outputs()]
        inputs = [i.name for i in sess.get_inputs()]
        acc = {n: FidelityAccumulator() for n in names}
        tally = {n: DecisionTally() for n in names}
        for done, ref in enumerate(refs, 1):
            got = run_checked(sess, names, {k: ref[k] for k in inputs}, first + done - 1)
            for name, value in zip(names, got):
                acc[name].update(ref[name], np.asarray(value))
                tally[name].update(ref[name], np.asarray(value))
            if progress:
                progress("evaluating", done, len(refs))
        return [OutputFidelity(n, a.cosine, a.sqnr_db, tally[n].decisions, tally[n].flips, tally[n].flipped,
                               tally[n].row_flips, tally[n].sequences)
                for n, a in acc.items() if a.count]
