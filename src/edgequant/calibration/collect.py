"""Run the float model over calibration samples and feed every observed tensor's observer.

One pass: every observed tensor is an extra output of one onnxruntime session, and the model
runs once per batch. Sizes are measured, never guessed from symbolic shapes: when the
exposed tensors of one batch exceed ``budget`` bytes, the rest of the samples are observed
in groups of tensors that fit it (sized by the largest batch seen), one pass over the data
per group, and the progress label says why. Memory stays bounded by the budget, never by
the number of samples.

The samples may be split into shards observed apart (``executor``: worker processes or a Ray
cluster); observers merge exactly, so the result is the same bytes as one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from onnx import ModelProto

from edgequant.calibration.method import Method
from edgequant.calibration.observers import MinMaxObserver, make_observer
from edgequant.data.sources import CalibrationSource
from edgequant.runtime.executor import Executor, InProcess, shards
from edgequant.runtime.feed import batched, run_checked
from edgequant.runtime.session import make_session

Progress = Callable[[str, int, int], None]

#: Bytes of exposed tensors one batch may hold before calibration splits them into groups.
MEMORY_BUDGET = 1 << 30


def group_tensors(sizes: list[int], budget: int) -> list[list[int]]:
    """Split tensor indices into consecutive groups whose summed size fits the budget."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, s in enumerate(sizes):
        if current and used + s > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += s
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class ObserveJob:
    """What every shard needs (picklable: it travels once to each worker)."""

    model: ModelProto
    roots: tuple[str, ...]
    methods: dict[str, tuple[Method, float]]  # root → (method, percentile)
    source: CalibrationSource
    batch: int
    can_batch: bool
    device: str
    budget: int
    progress: Progress | None = None  # only when the shards run in this process


@dataclass
class ShardResult:
    observers: dict[str, MinMaxObserver]
    seen: int
    groups: int
    batch_bytes: int  # the largest batch of exposed tensors measured


class _Shard:
    def __init__(self, job: ObserveJob, start: int, stop: int):
        self.job, self.start, self.stop = job, start, stop
        self.observers = {r: make_observer(*job.methods[r]) for r in job.roots}
        self.sizes = [0] * len(job.roots)  # largest measured bytes per tensor
        self.position = {r: i for i, r in enumerate(job.roots)}
        self.done = 0  # progress units: samples × passes

    def tick(self, n: int, total: int, label: str) -> None:
        self.done += n
        if self.job.progress:
            self.job.progress(label, self.done, total)

    def observe(self, names: list[str], first: int, stop_when_over: bool, total: int, label: str) -> int:
        """Run the samples from ``first`` with ``names`` exposed; the samples seen. With
        ``stop_when_over``, stop after the first batch whose tensors exceed the budget."""
        job = self.job
        session = make_session(job.model, names, job.device)
        seen = 0
        samples = job.source.samples(self.start + first, self.stop)
        for feed, n in batched(samples, job.batch, job.can_batch):
            values = run_checked(session, names, feed, self.start + first + seen)
            used = 0
            for name, value in zip(names, values):
                i = self.position[name]
                self.sizes[i] = max(self.sizes[i], value.nbytes)
                used += value.nbytes
                self.observers[name].update(value)
            del values
            seen += n
            self.tick(n, total, label)
            if stop_when_over and used > job.budget:
                break
        return seen

    def run(self) -> ShardResult:
        job, count = self.job, self.stop - self.start
        names = list(job.roots)
        seen = self.observe(names, 0, True, count, "calibrating")
        if seen == count or not seen:
            return ShardResult(self.observers, seen, 1, sum(self.sizes))
        groups = group_tensors(self.sizes, job.budget)
        rest = count - seen
        label = (f"calibrating in {len(groups)} groups ({sum(self.sizes) >> 20} MB of tensors per batch "
                 f"> {job.budget >> 20} MB budget)")
        total = seen + rest * len(groups)
        for group in groups:
            more = self.observe([names[i] for i in group], seen, False, total, label)
        return ShardResult(self.observers, seen + more, len(groups), sum(self.sizes))


def observe_shard(job: ObserveJob, span: tuple[int, int]) -> ShardResult:
    """Observers of ``job.roots`` over samples ``[start, stop)`` (a work unit)."""
    return _Shard(job, *span).run()


def collect_ranges(model: ModelProto, roots: list[str], source: CalibrationSource, method: Method,
                   percentile: float, count: int, *, batch_size: int = 1, device: str = "cpu",
                   methods: dict[str, tuple] | None = None, progress: Progress | None = None,
                   executor: Executor | None = None,
                   budget: int = MEMORY_BUDGET) -> tuple[dict[str, MinMaxObserver], int]:
    """Observe ``roots`` over the first ``count`` samples.

    ``methods`` gives some roots their own (method, percentile or None) instead of
    ``method``/``percentile``. Returns one observer per tensor and the number of samples
    actually seen (fewer than ``count`` when the source runs out).
    """
    methods = methods or {}
    chosen = {}
    for root in roots:
        m, pct = methods.get(root, (None, None))
        chosen[root] = (m or method, pct if pct is not None else percentile)
    if not roots:  # nothing to observe (e.g. every quantizable op sits in an If/Loop body)
        return {}, count
    executor = executor or InProcess()
    can_batch = all(not s.batch_fixed for s in source.specs)
    batch = batch_size if can_batch else 1
    here = isinstance(executor, InProcess)
    job = ObserveJob(model, tuple(roots), chosen, source, batch, can_batch, device, budget,
                     progress if here else None)
    spans = shards(count, executor.workers, align=batch)
    with executor.pool(job) as pool:
        results: list[ShardResult] = pool.map(observe_shard, spans)
    observers = results[0].observers
    for r in results[1:]:
        for root, obs in r.observers.items():
            observers[root].merge(obs)
    return observers, sum(r.seen for r in results)
