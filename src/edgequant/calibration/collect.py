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

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from edgequant.calibration.method import Method
from edgequant.calibration.observers import MinMaxObserver, make_observer
from edgequant.data.sources import CalibrationSource, Sample
from edgequant.runtime.executor import Executor, InProcess, shards
from edgequant.runtime.feed import batched, run_checked, run_in_place
from edgequant.runtime.session import extremes, make_session

Progress = Callable[[str, int, int], None]

#: Bytes of exposed tensors one batch may hold before calibration splits them into groups
#: (two batches are alive at a time: one observed while the next runs).
MEMORY_BUDGET = 1 << 30
#: onnxruntime's threads for calibration runs and the threads updating observers meanwhile
#: (more observer threads than cores: they wait on memory). On two cores, PP-OCRv4's
#: recognizer, 512 lines: 22.9 s with 1 + 4, 23.8 s with 1 + 2; 64 lines, inference and
#: observers taking turns on both cores: 5.1 s against 4.2 s overlapped.
INFERENCE_THREADS = max(1, (os.cpu_count() or 1) // 2)
OBSERVER_THREADS = min(8, 2 * (os.cpu_count() or 1))


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
        self.done = 0  # samples of the current pass
        self.threads: ThreadPoolExecutor

    def tick(self, n: int, total: int, label: str) -> None:
        self.done += n
        if self.job.progress:
            self.job.progress(label, self.done, total)

    def observe(self, roots: list[str], first: int, stop_when_over: bool, total: int, label: str) -> int:
        """Run the samples from ``first`` observing ``roots``; the samples seen. Histograms get
        their tensor; a range alone (minmax) comes from in-graph ReduceMin/ReduceMax, so its
        tensor never leaves onnxruntime. With ``stop_when_over``, stop after the first batch
        whose exposed tensors exceed the budget."""
        job = self.job
        full = [r for r in roots if self.observers[r].needs_values]
        ranged = [r for r in roots if not self.observers[r].needs_values]
        nodes, ends = extremes(job.model, ranged)
        names = full + [e for r in ranged for e in ends[r]]
        session = make_session(job.model, names, job.device, threads=INFERENCE_THREADS, extra_nodes=nodes,
                               arena=False)
        seen = 0
        samples = job.source.samples(self.start + first, self.stop)
        for feed, values, n in _runs(session, names, batched(samples, job.batch, job.can_batch), self.start + first):
            used = 0
            for name, value in zip(full, values):
                i = self.position[name]
                self.sizes[i] = max(self.sizes[i], value.nbytes)
                used += value.nbytes
            lows, highs = values[len(full)::2], values[len(full) + 1::2]
            self._ranges_only(ranged, {r: (float(lo), float(hi)) for r, lo, hi in zip(ranged, lows, highs)}, feed)
            # one observer per tensor: they update side by side (the histogram kernel and numpy
            # release the GIL), each in batch order
            pairs = list(zip([self.observers[r] for r in full], values[:len(full)]))
            list(self.threads.map(_update_all, _balanced(pairs, OBSERVER_THREADS)))
            del values
            seen += n
            self.tick(n, total, label)
            if stop_when_over and 2 * used > job.budget:  # this batch and the next one
                break
        return seen

    def _ranges_only(self, roots: list[str], extents: dict[str, tuple[float, float]], feed: Sample) -> None:
        """Range observers take the batch's extremes; a tensor holding ±inf (ignored, as NaN
        is) is fetched and filtered instead."""
        rerun = []
        for r in roots:
            lo, hi = extents[r]
            if math.isfinite(lo) and math.isfinite(hi):
                self.observers[r].extend(lo, hi)
            elif not (lo == math.inf and hi == -math.inf):  # (inf, -inf): an empty tensor
                rerun.append(r)
        if rerun:
            for r, value in zip(rerun, run_checked(make_session(self.job.model, rerun, self.job.device),
                                                   rerun, feed, 0)):
                self.observers[r].update(value)

    def run(self) -> ShardResult:
        job, count = self.job, self.stop - self.start
        names = list(job.roots)
        seen = self.observe(names, 0, True, count, "calibrating")
        if seen == count or not seen:
            return ShardResult(self.observers, seen, 1, sum(self.sizes))
        groups = group_tensors(self.sizes, job.budget)
        for k, group in enumerate(groups, 1):  # the bar counts samples; the note says which pass
            label = (f"calibrating · tensor group {k} of {len(groups)} ({sum(self.sizes) >> 20} MB of tensors a "
                     f"batch > {job.budget >> 20} MB budget)")
            self.done = seen
            more = self.observe([names[i] for i in group], seen, False, count, label)
        return ShardResult(self.observers, seen + more, len(groups), sum(self.sizes))


def _runs(session, names: list[str], batches: Iterator[tuple[Sample, int]],
          index: int) -> Iterator[tuple[Sample, list, int]]:
    """(feed, exposed tensors, samples) of each batch; the next batch runs while the caller
    observes this one (onnxruntime and the observer kernels release the GIL)."""
    with ThreadPoolExecutor(1) as runner:
        def start(batch: tuple[Sample, int] | None, at: int):
            if batch is None:
                return None
            return runner.submit(run_in_place, session, names, batch[0], at), batch

        pending = start(next(batches, None), index)
        while pending is not None:
            future, (feed, n) = pending
            index += n
            values = future.result()
            pending = start(next(batches, None), index)
            yield feed, values, n


def _update_all(pairs: list[tuple[MinMaxObserver, np.ndarray]]) -> None:
    for observer, value in pairs:
        observer.update(value)


def _balanced(pairs: list[tuple[MinMaxObserver, np.ndarray]], parts: int) -> list[list]:
    """``pairs`` cut into up to ``parts`` contiguous runs of about equal element counts (one
    task per thread, not one per tensor: a task costs more than a small tensor's update)."""
    total = sum(v.size for _, v in pairs) or 1
    runs: list[list] = [[] for _ in range(parts)]
    done = 0
    for pair in pairs:
        runs[min(parts - 1, done * parts // total)].append(pair)
        done += pair[1].size
    return [r for r in runs if r]


def observe_shard(job: ObserveJob, span: tuple[int, int]) -> ShardResult:
    """Observers of ``job.roots`` over samples ``[start, stop)`` (a work unit)."""
    shard = _Shard(job, *span)
    with ThreadPoolExecutor(OBSERVER_THREADS) as shard.threads:
        return shard.run()


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
