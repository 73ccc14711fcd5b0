"""Automatic mixed precision: move the fewest, cheapest layers to a fallback precision until the
quantized model reaches a fidelity target on held-out samples.

1. Calibrate once (16-bit ranges come from the same observers), assemble the all-8-bit model.
2. Rank layers by sensitivity (each quantized alone; analysis.layerwise) and price each by its
   share of the model's MACs (mixed.cost).
3. Take layers in order of damage per cost: grow the set geometrically (1, 2, 4, … layers)
   until the target is met or the budget of MACs is spent, then bisect to the shortest
   prefix that meets it, then try dropping each chosen layer again. Every step assembles a
   model from the cached observers and runs it on the cached samples: one quantized
   evaluation, never a recalibration.

Fidelity is the cosine (default) or SQNR of the worst output on the worst sample — a pooled
figure hides the rare input that int8 breaks — or a user metric (higher is better). Outputs of
a few elements (a probability, a score) and samples whose output is near zero (a recurrent
state at rest) are judged pooled over the samples instead, where a cosine means something.
Outputs that are class probabilities (rows in [0, 1] summing to 1) must also keep their
decisions: the share of samples whose every decided row keeps its argmax counts against the
same target. So must scores in [0, 1] (sigmoid outputs): 1 − (1 − F1) of their confident
decisions (``analysis.metrics.DecisionTally``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto

from edgequant.analysis.layerwise import float_cache
from edgequant.analysis.metrics import DecisionTally, FidelityAccumulator, is_distribution, is_score
from edgequant.analysis.plots import png_of, pyplot
from edgequant.api import calibrate, onnx_model, resolve_config
from edgequant.calibrated import CalibratedModel
from edgequant.data.inputs import InputSettings
from edgequant.data.sources import Sample
from edgequant.errors import ConfigError
from edgequant.ir.model import write_atomic
from edgequant.mixed.cost import layer_macs
from edgequant.mixed.sensitivity import Sensitivity, sensitivity
from edgequant.pipeline import finish
from edgequant.planning.options import QuantOptions, Recovery, parse_options
from edgequant.planning.overrides import FLOAT, Override, parse_precision
from edgequant.planning.plan import QuantPlan
from edgequant.quant.dtypes import QuantDType
from edgequant.result import QuantizeResult
from edgequant.runtime.executor import InProcess, Pool, shards
from edgequant.runtime.feed import run_checked
from edgequant.runtime.session import make_session
from edgequant.targets import get_target

Progress = Callable[[str, int, int], None]
Metric = Callable[[ModelProto], float]


@dataclass(frozen=True)
class MixedOptions:
    """What ``--auto-mixed`` aims for and what it may spend (validated here, once).

    ``target_cosine``/``target_sqnr``: the worst output on the worst sample (cosine 0.99 when
    neither is given); ``metric(qmodel) -> float`` (higher is better) searches on a task
    metric instead, aiming at the float model's metric minus ``metric_tolerance``;
    ``max_high_precision``: the share of MACs allowed above 8 bits; ``fallback``: what chosen
    layers become (int16, uint16 or float); ``search_samples``: the first samples (calibration
    and held-out alike) sensitivity and candidates are judged on; ``recover``: first fix the
    rounding with the recovery algorithms that keep layers in their bits (``recovery_for``),
    then search from there (None: when the target cannot run float layers).
    """

    target_cosine: float | None = None
    target_sqnr: float | None = None
    metric: Metric | None = None
    metric_tolerance: float = 0.01
    max_high_precision: float = 0.10
    fallback: QuantDType | str = QuantDType.INT16
    search_samples: int = 64
    recover: bool | None = None

    def __post_init__(self) -> None:
        fallback = parse_precision(self.fallback) if isinstance(self.fallback, str) else self.fallback
        if fallback not in (FLOAT, QuantDType.INT16, QuantDType.UINT16):
            raise ConfigError(f"fallback {self.fallback!r} must be int16, uint16 or float")
        object.__setattr__(self, "fallback", fallback)
        if not 0.0 < self.max_high_precision <= 1.0:
            raise ConfigError(f"max high precision must be a share of MACs in (0, 1], got {self.max_high_precision}")
        if self.target_cosine is not None and self.target_sqnr is not None:
            raise ConfigError("give --target-cosine or --target-sqnr, not both")
        if self.search_samples < 1:
            raise ConfigError(f"search samples must be ≥ 1, got {self.search_samples}")

    @property
    def tag(self) -> str:
        return self.fallback if isinstance(self.fallback, str) else self.fallback.value

    @property
    def measure(self) -> str:
        return "metric" if self.metric else ("sqnr_db" if self.target_sqnr is not None else "cosine")


@dataclass(frozen=True)
class Step:
    overrides: tuple[Override, ...]
    cost: float
    score: float
    reached: bool


@dataclass
class MixedPrecision:
    """The search's choice, what it costs, and every model it evaluated."""

    overrides: tuple[Override, ...]
    cost: float
    score: float
    target: float
    measure: str
    reached: bool
    steps: list[Step] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    candidates: int = 0

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(str(o.selector) for o in self.overrides)

    def describe(self) -> str:
        state = "reached" if self.reached else "NOT reached"
        floats = sum(o.precision == FLOAT for o in self.overrides)
        extra = f", {floats} of them float" if floats and floats < len(self.overrides) else ""
        return (f"{len(self.overrides)} layers in higher precision{extra} ({self.cost:.1%} of MACs); {self.measure} "
                f"{self.score:.4f}, target {self.target:.4f} {state}; {len(self.steps)} models evaluated")

    def override_file(self) -> str:
        """A config fragment (``-c`` or ``--override-file``) that reproduces the choice."""
        head = f"# edgequant --auto-mixed: {self.describe()}\n"
        items = "".join(f'    - "{o}"\n' for o in self.overrides)
        return head + "quantization_parameters:\n  overrides:" + (" []\n" if not items else "\n" + items)

    def pareto(self) -> list[Step]:
        """The evaluated models no other beats on both cost and score, cheapest first."""
        front: list[Step] = []
        for s in sorted(self.steps, key=lambda s: (s.cost, -s.score, len(s.overrides))):
            if not front or s.score > front[-1].score:
                front.append(s)
        return front

    def plot_png(self) -> bytes:
        """Every evaluated model as a point (each is its own set of layers: no line joins them),
        the Pareto front of cost against score as a step line, the target, and the chosen
        model with its layers named."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        ax.scatter([s.cost * 100 for s in self.steps], [s.score for s in self.steps], s=14, color="0.55",
                   label=f"evaluated ({len(self.steps)} models)", zorder=2)
        front = self.pareto()
        ax.step([s.cost * 100 for s in front], [s.score for s in front], where="post", color="tab:blue", lw=1.0,
                label="Pareto front (best score for its cost)", zorder=3)
        ax.axhline(self.target, color="tab:green", ls=":", label=f"target {self.target:.4g}")
        ax.scatter([self.cost * 100], [self.score], marker="*", s=160, color="tab:red", zorder=4,
                   label=f"chosen: {len(self.overrides)} layers")
        names = [str(o.selector) for o in self.overrides]
        if names:
            text = "\n".join(n[-40:] for n in names[:6]) + (f"\n… {len(names) - 6} more" if len(names) > 6 else "")
            ax.annotate(text, (self.cost * 100, self.score), fontsize=7, xytext=(12, -8), textcoords="offset points",
                        va="top", bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9})
        ax.set_xlabel("MACs in higher precision (%)")
        ax.set_ylabel(f"{self.measure} (higher is better)")
        ax.set_title("mixed-precision search: each point is one set of layers kept in higher precision", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return png_of(fig)

    def write(self, stem: str | Path) -> tuple[Path, Path]:
        """``STEM.mixed.yaml`` and ``STEM.mixed.png``."""
        stem = Path(stem)
        yaml_path, png_path = stem.with_name(stem.name + ".mixed.yaml"), stem.with_name(stem.name + ".mixed.png")
        write_atomic(yaml_path, self.override_file())
        write_atomic(png_path, self.plot_png())
        return yaml_path, png_path


@dataclass(frozen=True)
class _ScoreJob:
    """What scoring a candidate needs besides the candidate (travels once to each worker)."""

    references: list[Sample]  # inputs and float outputs of the search samples
    inputs: list[str]
    decisions: list[str]  # class-probability outputs and [0, 1] scores, judged on their decisions too
    device: str


SampleScore = tuple[dict[str, FidelityAccumulator], dict[str, DecisionTally]]


def _score_span(job: _ScoreJob, item: tuple[ModelProto, int, int]) -> list[SampleScore]:
    """Per sample of ``[lo, hi)``: each output's accumulator and each decision check (a work unit)."""
    qmodel, lo, hi = item
    sess = make_session(qmodel, device=job.device)
    names = [o.name for o in sess.get_outputs()]
    out = []
    for i in range(lo, hi):
        values = job.references[i]
        got = run_checked(sess, names, {k: values[k] for k in job.inputs}, i)
        accs, tallies = {}, {}
        for n, v in zip(names, got):
            acc = FidelityAccumulator()
            acc.update(values[n], np.asarray(v))
            if acc.count:
                accs[n] = acc
            if n in job.decisions:
                tallies[n] = DecisionTally()
                tallies[n].update(values[n], np.asarray(v))
        out.append((accs, tallies))
    return out


class _Scorer:
    """Scores a plan: assemble from the cached observers, run on the cached float samples
    (split over the pool's workers; the score is the same whichever runs them)."""

    def __init__(self, state: CalibratedModel, job: _ScoreJob, pool: Pool, parts: int, measure: str,
                 metric: Metric | None):
        self.state, self.job, self.pool, self.parts = state, job, pool, parts
        self.measure, self.metric = measure, metric

    def __call__(self, plan: QuantPlan) -> float:
        qmodel, _ = self.state.assemble(plan)
        if self.metric is not None:
            return float(self.metric(qmodel))
        spans = shards(len(self.job.references), self.parts)
        samples = [r for part in self.pool.map(_score_span, [(qmodel, lo, hi) for lo, hi in spans]) for r in part]
        pairs: dict[str, list[FidelityAccumulator]] = {}
        kept = {n: DecisionTally() for n in self.job.decisions}
        for accs, tallies in samples:
            for n, acc in accs.items():
                pairs.setdefault(n, []).append(acc)
            for n, t in tallies.items():
                kept[n].merge(t)
        scores = [worst_sample_score(accs, self.measure) for accs in pairs.values() if accs]
        scores += [t.decisions for t in kept.values() if t.decisions is not None]
        scores += [1.0 - t.flips for t in kept.values() if t.flips is not None]
        return min(scores) if scores else 1.0


#: Below this many elements per sample an output is judged pooled over the samples (the cosine
#: of one probability is always 1); a sample whose output has less than this share of the
#: mean power is judged pooled too (a near-zero state's cosine is noise, not damage).
POOL_BELOW_ELEMENTS = 16
POOL_BELOW_POWER = 0.1


def worst_sample_score(accs: list[FidelityAccumulator], measure: str) -> float:
    """Fidelity of one output over samples: the pooled figure, and each substantial sample's."""
    pooled = FidelityAccumulator()
    for a in accs:
        pooled.merge(a)

    def value(a: FidelityAccumulator) -> float:
        return a.cosine if measure == "cosine" else a.sqnr_db
    worst = value(pooled) if not pooled.nonfinite else -1.0
    mean_power = pooled.ref2 / len(accs)
    for a in accs:
        if a.elements >= POOL_BELOW_ELEMENTS and a.ref2 >= POOL_BELOW_POWER * mean_power:
            worst = min(worst, value(a))
    return worst


def auto_mixed(model: str | os.PathLike | ModelProto, calibration=None, *, target_cosine: float | None = None,
               target_sqnr: float | None = None, metric: Metric | None = None, metric_tolerance: float = 0.01,
               max_high_precision: float = 0.10, fallback: str = "int16", search_samples: int = 64,
               recover: bool | None = None, config=None, options: QuantOptions | None = None,
               input_settings: list[InputSettings] | None = None, progress: Progress | None = None,
               transform_fn: Callable[[Any], Any] | None = None, example_inputs: Any = None,
               layout: str | None = None, **changes: Any) -> tuple[QuantizeResult, MixedPrecision]:
    """Quantize ``model`` and keep the layers it needs in ``fallback`` precision (see module doc).

    Returns ``(QuantizeResult, MixedPrecision)``. The search's own keywords are those of
    ``MixedOptions``; ``config``, ``options``, ``input_settings`` and ``changes``
    (``QuantOptions`` fields) are ``quantize``'s, parsed here once. Sensitivity and
    cosine/SQNR are measured on the first ``search_samples`` samples (calibration and held-out
    alike: the search picks precisions, it fits nothing); the result's summary reports
    fidelity on the held-out samples as usual.
    """
    settings = MixedOptions(target_cosine, target_sqnr, metric, metric_tolerance, max_high_precision, fallback,
                            search_samples, recover)
    cfg = resolve_config(config)
    opts = parse_options(options or (cfg.options if cfg else None), changes)
    wants = settings.recover if settings.recover is not None else "float" not in get_target(opts.target).fallback
    if wants and not opts.recovery:
        opts = dataclasses.replace(opts, recovery=recovery_for(opts))
    model = onnx_model(model, example_inputs, layout, opts)
    state = calibrate(model, calibration, config=cfg, options=opts, input_settings=input_settings, progress=progress,
                      min_opset=21 if settings.fallback != FLOAT else 0, transform_fn=transform_fn)
    plan, mixed = search_mixed(state, settings, progress)
    result = finish(state, plan, progress)
    result.summary.notes.append(f"auto-mixed: {mixed.describe()}")
    return result, mixed


def recovery_for(options: QuantOptions) -> Recovery:
    """The recovery that keeps layers in their bits for these options: empirical bias
    correction always; cross-layer equalization for per-tensor weights (their ranges are
    shared by every channel); GPTQ rounding for 4-bit weights."""
    return Recovery(cle=not options.per_channel, bias_correction="empirical", gptq=options.weight_dtype.bits == 4)


def search_mixed(state: CalibratedModel, settings: MixedOptions,
                 progress: Progress | None = None) -> tuple[QuantPlan, MixedPrecision]:
    """The plan with the fewest, cheapest layers in ``settings.fallback`` that meets the target
    (or the best within the budget), and the search's account of it."""
    t0 = time.perf_counter()
    profile = get_target(state.options.target)
    tag = settings.tag
    if tag not in profile.fallback and not (tag == "uint16" and "int16" in profile.fallback):
        raise ConfigError(f"target {profile.name} cannot run {tag} layers (its fallbacks: "
                          f"{', '.join(profile.fallback) or 'none'}); choose --fallback accordingly")
    base, _ = state.assemble(state.plan)
    sens = sensitivity(state, base, progress, samples=settings.search_samples)
    t1 = time.perf_counter()
    references = _output_cache(state, sens, settings.search_samples)
    measure = settings.measure
    inputs = [i.name for i in state.model.graph.input if i.name in references[0]]
    outputs = [o.name for o in state.model.graph.output]
    # class probabilities and [0, 1] scores: the decisions (top-1 per row, the side of 0.5)
    # must survive too, not only the cosine
    decisions = [n for n in outputs if measure == "cosine" and (all(is_distribution(v.get(n)) for v in references)
                                                                 or all(is_score(v.get(n)) for v in references))]
    if settings.metric is not None:
        target = float(settings.metric(state.model)) - settings.metric_tolerance
    else:
        target = settings.target_sqnr if settings.target_sqnr is not None else (
            settings.target_cosine if settings.target_cosine is not None else 0.99)
    shares, ranked = _ranking(state, sens)
    executor = state.executor() if settings.metric is None else InProcess()  # a metric may not pickle
    job = _ScoreJob(references, inputs, decisions, state.options.device)
    with executor.pool(job) as pool:
        score = _Scorer(state, job, pool, executor.workers, measure, settings.metric)
        search = _Search(state, score, target, shares, tag, progress, profile.fallback_weight)
        chosen = search.run(ranked, settings.max_high_precision,
                            escalate=tag != "float" and "float" in profile.fallback)
    if decisions:
        measure = "cosine, samples keeping their decisions"
    value = search.value(chosen)
    mixed = MixedPrecision(search.overrides(chosen), search.cost(chosen), value, target, measure, value >= target,
                           search.steps, {"sensitivity": t1 - t0, "search": time.perf_counter() - t1}, len(ranked))
    return search.plan(chosen), mixed


def _ranking(state: CalibratedModel, sens: Sensitivity) -> tuple[dict[str, float], list[str]]:
    """(share of MACs each damaging layer costs, those layers in order of damage per cost)."""
    names = [r.node for r in sens.layers]
    macs = layer_macs(state.model, sens.cache[0], [n.name for n in state.model.graph.node])
    total = max(sum(macs.get(n, 0) for n in names), 1)
    charged = charged_macs(state.model, state.plan, macs, names)
    ranked = [r for r in sens.ranked() if r.output.nonfinite or r.output.cosine < 1.0 - 1e-7]
    ranked.sort(key=lambda r: (not r.output.nonfinite, -(1.0 - r.output.cosine) / max(charged[r.node] / total, 1e-4)))
    return {r.node: charged[r.node] / total for r in ranked}, [r.node for r in ranked]


def charged_macs(model: ModelProto, plan: QuantPlan, macs: dict[str, int], names: list[str]) -> dict[str, int]:
    """What moving each named layer out of 8 bits costs, in MACs: its own, and those of every
    compute op (Conv, Gemm, MatMul, LSTM…) that reads a tensor whose precision the move
    changes. An override widens the layer's input tensors and every tensor sharing their
    parameters, so a 16-bit Slice in front of a Conv makes that Conv a 16-bit Conv: on an NPU
    both operands must be 8-bit for an 8-bit MAC."""
    from edgequant.ir.graph import consumers as consumers_of
    from edgequant.mixed.cost import OPERANDS

    readers = consumers_of(model.graph)
    members = plan.members()
    by_name = {n.name: n for n in model.graph.node}
    out: dict[str, int] = {}
    for name in names:
        node = by_name.get(name)
        cost = macs.get(name, 0)
        if node is not None:
            changed = {t for i in node.input if i in plan.activations
                       for t in members.get(plan.activations[i].root, [i])}
            hit = {c.name for t in changed for c in readers.get(t, []) if c.op_type in OPERANDS and c.name != name}
            cost += sum(macs.get(c, 0) for c in hit)
        out[name] = cost
    return out


#: Most single-layer trials (pruning, moving a float layer back to 16 bits) in one search.
PRUNE_TRIALS = 16


def _output_cache(state: CalibratedModel, sens: Sensitivity, samples: int) -> list[Sample]:
    """Inputs and float outputs of the first ``samples`` samples. The layerwise cache keeps every
    tensor and stops at its memory budget (a few samples of a large model); the search must
    judge every sample, or it fits the few it sees."""
    count = state.split.first(samples)
    if len(sens.cache) >= count:
        return sens.cache
    return float_cache(state.model, state.samples(0, count), 1 << 30, state.options.device, outputs_only=True)


def _feeders(state: CalibratedModel) -> dict[str, list[str]]:
    """Node → the nodes without weights (no MACs) that write its float inputs."""
    graph = state.model.graph
    weighted = {n.name for n in graph.node if any(i in {t.name for t in graph.initializer} for i in n.input[1:2])
                and n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")}
    prod = {o: n for n in graph.node for o in n.output if o}
    return {n.name: [prod[i].name for i in dict.fromkeys(n.input) if i in prod and prod[i].name not in weighted]
            for n in graph.node}


class _Search:
    """Layers are taken in ``order``; each goes to ``tag`` unless escalated to float."""

    def __init__(self, state: CalibratedModel | None, score: Callable[[QuantPlan], float] | None, target: float,
                 share: dict[str, float], tag: str, progress: Progress | None,
                 wide_weight: QuantDType = QuantDType.INT16):
        self.state, self.score, self.target, self.share, self.tag = state, score, target, share, tag
        self.wide_weight = wide_weight
        self.progress = progress
        self.precision: dict[str, str] = {}  # layers escalated beyond ``tag``
        self.scores: dict[tuple[Override, ...], float] = {}
        self.steps: list[Step] = []
        self.feeders = _feeders(state) if state is not None and state.options.quantize_all_ops else {}

    def _override(self, name: str) -> Override:
        precision = parse_precision(self.precision.get(name, self.tag))
        # a 16-bit layer is 16-bit throughout where the target runs that: int8 weights can cost
        # more than the int16 activations save (PP-OCRv4's recognizer, 16-bit activations
        # everywhere: 46 of 48 calibration lines decode as in float with int8 weights, all 48
        # with int16)
        wide = precision in (QuantDType.INT16, QuantDType.UINT16) and self.wide_weight.bits == 16
        return Override(name, precision, weight=self.wide_weight if wide else None)

    def overrides(self, layers) -> tuple[Override, ...]:
        out = [self._override(n) for n in layers]
        # on a chip that quantizes every op a float layer reads what its producer wrote in int8:
        # the weightless producers of its inputs go to float with it (TPU-MLIR: F32 for both)
        named = set(layers)
        for n in layers if self.feeders else []:
            if parse_precision(self.precision.get(n, self.tag)) == FLOAT:
                for p in self.feeders.get(n, ()):
                    if p not in named:
                        named.add(p)
                        out.append(Override(p, FLOAT))
        return tuple(out)

    def plan(self, layers) -> QuantPlan:
        assert self.state is not None  # a search without a state scores no real plans
        return self.state.plan_with(self.overrides(layers))

    def cost(self, layers) -> float:
        return sum(self.share[n] for n in layers)

    def value(self, layers) -> float:
        key = self.overrides(layers)
        if key not in self.scores:
            assert self.score is not None
            self.scores[key] = self.score(self.plan(layers))
            self.steps.append(Step(key, self.cost(layers), self.scores[key], self.scores[key] >= self.target))
            if self.progress:
                self.progress("mixed search", len(self.steps), len(self.steps))
        return self.scores[key]

    def ok(self, layers: list[str]) -> bool:
        return self.value(layers) >= self.target

    def run(self, order: list[str], budget: float, escalate: bool = False) -> list[str]:
        """The shortest prefix of ``order`` within ``budget`` that meets the target, pruned.

        With ``escalate``, when no prefix meets it, the layers of the best prefix go to float
        (16 bits do not rescue ranges no fixed-point grid spans: a power spectrum, a
        variance) and the search runs again (when that scores no better, the 16-bit choice
        stays); then the fewest float layers, in rank order, that still meet the target (or,
        out of reach, still score the best found) are found by bisection (the rest go back to
        ``tag``), and the dearest of those are tried back one by one. Single-layer trials
        (here and in the pruning) are capped at ``PRUNE_TRIALS``, so a search costs tens of
        models, not one per layer.
        """
        chosen = self._run(order, budget)
        if escalate and chosen and not self.ok(chosen):
            narrow, narrow_value = chosen, self.value(chosen)
            self.precision = {n: "float" for n in chosen}
            chosen = self._run(order, budget)
            if not self.ok(chosen) and self.value(chosen) <= narrow_value:  # float bought nothing
                self.precision = {}
                return narrow
            floats = [n for n in chosen if n in self.precision]
            goal = min(self.target, self.value(chosen))  # out of reach: keep the best score found
            if floats:
                def good() -> bool:
                    return self.value(chosen) >= goal

                def keep(j: int) -> bool:
                    self.precision = {n: "float" for n in floats[:j]}
                    return good()
                lo, hi = 0, len(floats)  # keep(hi) holds; find the smallest j that does
                if keep(0):
                    hi = 0
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if keep(mid) else (mid, hi)
                keep(hi)
                for n in sorted(floats[:hi], key=lambda n: -self.share[n])[:PRUNE_TRIALS]:
                    del self.precision[n]
                    if not good():
                        self.precision[n] = "float"
            self.precision = {n: p for n, p in self.precision.items() if n in chosen}
        return chosen

    def _run(self, order: list[str], budget: float) -> list[str]:
        if self.ok([]):
            return []
        fits, spent = [], 0.0
        for n in order:  # a layer too dear for what is left is skipped, not the end of the list
            if spent + self.share[n] <= budget + 1e-12:
                fits.append(n)
                spent += self.share[n]
        order, max_k = fits, len(fits)
        lo, hi, k = 0, None, 1
        while k <= max_k:
            if self.ok(order[:k]):
                hi = k
                break
            lo = k
            k = max_k if k < max_k < 2 * k else 2 * k
        if hi is None:  # the budget does not reach the target: the best prefix found within it
            tried = [order[:k] for k in range(max_k + 1) if self.overrides(order[:k]) in self.scores]
            return max(tried, key=lambda layers: (self.value(layers), -len(layers)))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.ok(order[:mid]):
                hi = mid
            else:
                lo = mid
        chosen = order[:hi]
        # drop what the others made unnecessary, dearest first
        for n in sorted(order[:hi], key=lambda n: (-self.share[n], -order.index(n)))[:PRUNE_TRIALS]:
            trial = [m for m in chosen if m != n]
            if len(chosen) > 1 and self.ok(trial):
                chosen = trial
        return chosen
