"""The stages, on typed values: prepare → plan → calibrate → (assemble, evaluate, guard).

``prepare`` turns a loaded float model into a ``Prepared`` one, ``calibrate`` plans it and
observes the calibration samples into a ``CalibratedModel``, and ``finish`` assembles a plan
from that state, checks it on the held-out samples and runs the collapse guard. The public
functions in ``api`` parse what users give (paths, config files, keywords) and call these.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import ModelProto

from edgequant.algorithms.bias_correction import add_zero_biases
from edgequant.algorithms.smoothquant import AlphaSearch
from edgequant.algorithms.stage import equalize_before, recover
from edgequant.bodies import body_lines, body_macs, quantize_bodies, state_counts
from edgequant.calibrated import CalibratedModel, Prepared, SampleSplit
from edgequant.calibration.collect import collect_ranges
from edgequant.data.sources import CalibrationSource
from edgequant.errors import CalibrationDataError, ModelLoadError
from edgequant.ir.graph import outline
from edgequant.ir.model import byte_size, ensure_opset, opset_of, skeleton
from edgequant.mixed.cost import eight_bit_macs
from edgequant.mixed.guard import collapse_report, judge
from edgequant.passes.constants import DivideByConstantToMul
from edgequant.passes.pad import FoldPadIntoConv
from edgequant.passes.pipeline import PassResult, prepare_model
from edgequant.passes.specialize import Specialize, has_control_flow
from edgequant.planning.options import QuantOptions
from edgequant.planning.overrides import Override, parse_precision, statistics_path
from edgequant.planning.plan import QuantPlan, build_plan, name_nodes, narrow_note
from edgequant.planning.selectors import Statistics
from edgequant.result import QuantizeResult, Summary
from edgequant.runtime.executor import executor_for
from edgequant.targets import get_target, repair_fallback

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


def check_onnx(model: ModelProto) -> None:
    """A one-line ModelLoadError when ``model`` is not valid ONNX (structure only)."""
    try:
        onnx.checker.check_model(skeleton(model), full_check=False)
    except Exception as exc:
        if byte_size(model) < 2_000_000_000:
            raise ModelLoadError(f"the model is not valid ONNX: {checker_message(exc)}") from None


def checker_message(exc: Exception) -> str:
    """onnx.checker's message on one line: what is wrong, then the node it names (the checker
    puts the node on a ``==> Context:`` line of its own)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    what = lines[0] if lines else type(exc).__name__
    context = next((ln for ln in lines[1:] if ln.startswith("==> Context:")), "")
    where = context.removeprefix("==> Context:").strip()
    if "Name:" in where:
        where = " ".join(where[where.index("Name:"):].split())
    return (what[:240] + (f" (at {where[:160]})" if where else "")).strip()


def prepare(original: ModelProto, options: QuantOptions, min_opset: int = 0,
            specialize: Specialize | None = None) -> Prepared:
    """Upgrade ``original`` to the opset the options need, specialize its shapes (when given:
    ``passes.specialize``), run the graph passes, name nodes.

    If per-channel weights are what cannot be had (the converter fails on this model), fall
    back to per-tensor weights and say so. ``original`` is the caller's own copy: the passes
    edit it in place when no upgrade was needed.
    """
    from_opset = opset_of(original)
    source = outline(original.graph)
    notes: list[str] = []
    try:
        model = ensure_opset(original, max(options.required_opset, min_opset))
    except ModelLoadError as exc:
        fallback = dataclasses.replace(options, per_channel=False)
        if not options.per_channel or fallback.required_opset > from_opset:
            raise
        note = (f"per-tensor weights: the model stays at opset {from_opset} because the upgrade "
                f"to 13 that per-channel weights need failed ({exc})")
        log.warning(note)
        model, options, notes = original, fallback, [note]
    layout = next((p.value for p in original.metadata_props if p.key == LAYOUT_NOTE_KEY), None)
    if layout:
        notes.append(layout)
    passes: list[PassResult] = []
    if specialize is not None:
        passes.append(PassResult(specialize.name, specialize(model)))
        notes.append(specialize.report.describe())
    passes += prepare_model(model, simplify=options.simplify)
    protected = [o for o in options.overrides if isinstance(o.selector, Statistics)]
    if protected:
        name_nodes(model)
        count = len(Statistics().select(model))
        notes.append(f"kept in {protected[0].precision} from the start: {count} nodes of decomposed normalisation "
                     "statistics (mean, x − mean, its square, + eps), which 8 bits cancel away "
                     "(--protect-statistics)")
    if options.quantize_constants and options.simplify:  # onnxruntime runs x · (1/c) in integer, not x / c
        div = DivideByConstantToMul()
        passes.append(PassResult(div.name, div(model)))
    if "pad" in options.fusions and options.simplify:  # as the NPU compilers do: no Pad of its own
        fold = FoldPadIntoConv()
        passes.append(PassResult(fold.name, fold(model)))
    name_nodes(model)
    return Prepared(model, options, passes, from_opset, tuple(notes), source)


def protect_statistics(model: ModelProto, options: QuantOptions) -> QuantOptions:
    """``options`` with the statistics of decomposed normalisations (``Statistics``) in the
    target's repair fallback from the start, before the user's overrides (which win), when
    ``options.protect_statistics`` and the model has any: float on onnxruntime, int16 on NPUs.
    Models without such a path keep their options, and their bytes."""
    precision = repair_fallback(get_target(options.target))
    if not options.protect_statistics or precision is None or any(isinstance(o.selector, Statistics) for o in options.overrides):
        return options
    if not statistics_path(list(model.graph.node)):
        return options
    return dataclasses.replace(options, overrides=(Override(Statistics(), parse_precision(precision)),)
                               + options.overrides)


def specialization(model: ModelProto, options: QuantOptions, source: CalibrationSource) -> Specialize | None:
    """The specialization the options ask for: their ``input_shapes`` and ``fixed_inputs``,
    and, for a model with control flow (``options.specialize``), the shape each other input
    has in every calibration sample and the value of each integer scalar input that is the
    same in all of them. None when there is nothing to fix."""
    shapes = dict(options.input_shapes)
    values: dict[str, np.ndarray] = {n: np.asarray(v) for n, v in options.fixed_inputs}
    if options.specialize and has_control_flow(model):
        seen: dict[str, set[tuple[int, ...]]] = {}
        scalars: dict[str, set] = {}
        limit = None if options.num_samples is None else options.num_samples + options.eval_samples
        for sample in source.samples(0, limit):
            for name, value in sample.items():
                value = np.asarray(value)
                seen.setdefault(name, set()).add(value.shape)
                if value.size == 1 and value.dtype.kind in "iub":
                    scalars.setdefault(name, set()).add(value.item())
        for name, kinds in seen.items():
            if name not in shapes and name not in values and len(kinds) == 1:
                shapes[name] = next(iter(kinds))
        for name, kinds in scalars.items():
            if name not in values and len(kinds) == 1 and len(seen[name]) == 1:
                values[name] = np.asarray(next(iter(kinds)))
    shapes = {n: s for n, s in shapes.items() if n not in values}  # a pinned input's shape is moot
    if not shapes and not values:
        return None
    return Specialize(shapes, values)


def split_samples(total: int | None, options: QuantOptions) -> SampleSplit:
    """How many samples calibrate and how many are held out for the fidelity check."""
    if total is None:  # not counted: nothing held out
        return SampleSplit(options.num_samples or 0, 0, options.eval_samples)
    n_eval = min(options.eval_samples, total // 5) if total >= 5 else 0
    n_calib = total - n_eval
    if options.num_samples is not None:
        n_calib = min(n_calib, options.num_samples)
    return SampleSplit(n_calib, n_eval, options.eval_samples)


def calibrate(prepared: Prepared, source: CalibrationSource, progress: Progress | None = None,
              started: float | None = None) -> CalibratedModel:
    """Plan the prepared model, observe the calibration samples, and run the recovery
    algorithms the options ask for (``algorithms.stage``)."""
    opts = prepared.options
    counted = not (opts.eval_samples == 0 and opts.num_samples is not None)  # else no need to count files
    split = split_samples(len(source) if counted else None, opts)
    reports: list = []
    original: ModelProto | None = None
    if opts.recovery.cle or opts.recovery.smoothquant is not None:
        count = min(opts.recovery.bias_correction_data_count, split.calibration or 64)
        original = ModelProto()
        original.CopyFrom(prepared.model)
        search = AlphaSearch(opts.activation_dtype, opts.activation_symmetric, opts.weight_dtype,
                             per_channel=opts.per_channel, per_channel_ops=opts.per_channel_ops, scheme=opts.scheme)
        reports = equalize_before(prepared.model, lambda: source.samples(0, count), opts.recovery, search)
        if original.graph.node == prepared.model.graph.node or not any("ReLU6 → Relu" in r.detail for r in reports):
            original = None  # rescaling alone keeps the float model's outputs: no second copy
    if opts.recovery.bias:
        add_zero_biases(prepared.model)
    plan = build_plan(prepared.model, opts, prepared.source)
    t0 = time.perf_counter()
    observers, seen = collect_ranges(prepared.model, plan.observed, source, opts.method, opts.percentile,
                                     split.calibration, batch_size=opts.batch_size, device=opts.device,
                                     methods=plan.calibration, progress=progress, executor=executor_for(opts.workers, opts.ray_address))
    if seen == 0:
        raise CalibrationDataError("the calibration data yields 0 samples")
    split = dataclasses.replace(split, calibration=seen)
    state = CalibratedModel(prepared, plan, observers, source, split, time.perf_counter() - t0,
                            started if started is not None else t0, recovery=tuple(reports), reference_model=original)
    state = recover(state, progress) if opts.recovery.rounding or opts.recovery.bias else state
    state.bodies = quantize_bodies(state, progress)
    return state


#: Metadata ``from_torch`` leaves on an NHWC export: what its edges hold, for the summary.
LAYOUT_NOTE_KEY = "edgequant.layout"

#: Fewer calibration samples than this get a note: ranges (and percentiles) from a handful of
#: samples follow those samples, not the data the model will see.
FEW_SAMPLES = 16


def few_samples(count: int) -> list[str]:
    if count >= FEW_SAMPLES:
        return []
    return [f"only {count} calibration sample{'s' if count != 1 else ''}: ranges from so few follow them, not the data "
            f"the model will see; give at least {FEW_SAMPLES} (100 or more is better)"]


def finish(state: CalibratedModel, plan: QuantPlan | None = None, progress: Progress | None = None,
           rank: bool = True) -> QuantizeResult:
    """Assemble ``plan`` (default: the state's own), check its fidelity on held-out samples,
    and run the collapse guard (``rank``: name the layers to blame, a sensitivity pass)."""
    plan = plan or state.plan
    qmodel, params = state.assemble(plan)
    opts = state.options
    fidelity = state.evaluate(qmodel, progress)
    first, count = state.split.eval_range
    quantized, float_inside = state_counts(plan, state.bodies)
    summary = Summary(quantized, dict(plan.float_ops), float_inside,
                      state.split.calibration, count, state.split.held_out == 0, state.calibration_seconds, 0.0,
                      (state.prepared.from_opset, opset_of(qmodel)), state.prepared.passes, fidelity,
                      list(state.prepared.notes) + few_samples(state.split.calibration) + list(state.bodies.notes)
                      + body_lines(state.bodies) + narrow_note(plan, opts.float_narrow_convs), dict(plan.precision),
                      recovery=list(state.recovery))
    summary.eight_bit_macs = eight_bit_macs(state.model, qmodel, state.tensor_shapes())
    if state.bodies.branches:  # the compute inside the quantized If branches
        inside = body_macs(state.bodies)
        summary.eight_bit_macs = (summary.eight_bit_macs[0] + inside[0], summary.eight_bit_macs[1] + inside[1])
    result = QuantizeResult(qmodel, state.model, plan, state.ranges(plan), params, summary, opts,
                            state.prepared.source)
    reason = judge(fidelity, opts.collapse_cosine)
    if reason:
        summary.collapse = collapse_report(state, result, reason, progress, rank=rank)
        if rank:
            log.warning("quantized outputs collapsed (%s); most sensitive layers: %s",
                        reason, ", ".join(summary.collapse.layers))
    summary.total_seconds = time.perf_counter() - state.started
    return result


def finish_repaired(state: CalibratedModel, recalibrate, progress: Progress | None = None,
                    exports: tuple[str, ...] = ()) -> QuantizeResult:
    """``finish``, then, where the guard finds the result broken and ``options.repair`` is on,
    the default repair (``mixed.repair``; ``recalibrate(options, min_opset)`` calibrates the
    same model and samples again)."""
    result = finish(state, progress=progress, rank=not state.options.repair)
    if result.summary.collapse is None or not state.options.repair:
        return result
    from edgequant.mixed.repair import repair

    return repair(state, result, recalibrate, progress, exports)
