"""Run the float model over calibration samples and feed every observed tensor's observer.

Tensors are exposed as extra outputs of one onnxruntime session. When the exposed tensors of a
batch would exceed ``memory_budget`` bytes, they are split into groups and the data is read
once per group: memory stays bounded by the budget, never by the number of samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
from onnx import ModelProto

from edgequant.calibration.observers import MinMaxObserver, make_observer
from edgequant.data.sources import CalibrationSource, Sample
from edgequant.errors import CalibrationDataError
from edgequant.ir.graph import static_shapes
from edgequant.planning.options import QuantOptions
from edgequant.runtime.session import make_session

Progress = Callable[[str, int, int], None]


def batched(samples: Iterator[Sample], size: int, can_batch: bool) -> Iterator[tuple[Sample, int]]:
    """Stack consecutive samples of equal shapes into batches of up to ``size``."""
    buf: list[Sample] = []

    def flush() -> tuple[Sample, int]:
        if len(buf) == 1:
            return buf[0], 1
        out = {k: np.concatenate([s[k] for s in buf]) for k in buf[0]}
        return out, len(buf)

    for s in samples:
        if buf and (not can_batch or len(buf) == size or
                    any(s[k].shape != buf[0][k].shape for k in s)):
            yield flush()
            buf = []
        buf.append(s)
    if buf:
        yield flush()


def run_checked(session, names: list[str] | None, feed: Sample, index: int) -> list:
    """``session.run`` whose failure on user data becomes a one-line CalibrationDataError."""
    try:
        return session.run(names, feed)
    except Exception as exc:  # onnxruntime raises its own exception types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
        raise CalibrationDataError(
            f"the model fails on calibration sample {index} ({shapes}): {text[-300:]}"
        ) from None


def _estimate_bytes(model: ModelProto, names: list[str], batch: int) -> list[int]:
    shapes = static_shapes(model.graph)
    sizes = []
    for n in names:
        dims = shapes.get(n)
        if dims is None:
            sizes.append(4 * 1_000_000)
            continue
        known = [d if isinstance(d, int) and d > 0 else 64 for d in dims]
        sizes.append(4 * int(np.prod(known, dtype=np.int64)) * batch)
    return sizes


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


def collect_ranges(model: ModelProto, roots: list[str], source: CalibrationSource,
                   options: QuantOptions, count: int, progress: Progress | None = None,
                   memory_budget: int = 1 << 30,
                   methods: dict[str, tuple] | None = None) -> tuple[dict[str, MinMaxObserver], int]:
    """Observe ``roots`` over the first ``count`` samples.

    ``methods`` gives some roots their own (method, percentile) instead of the options'.
    Returns one observer per tensor and the number of samples actually seen (fewer than
    ``count`` when the source runs out).
    """
    methods = methods or {}
    observers = {}
    for root in roots:
        method, pct = methods.get(root, (None, None))
        observers[root] = make_observer(method or options.method, pct if pct is not None else options.percentile)
    if not roots:  # nothing to observe (e.g. every quantizable op sits in an If/Loop body)
        return observers, count
    can_batch = all(not s.batch_fixed for s in source.specs)
    batch = options.batch_size if can_batch else 1
    groups = group_tensors(_estimate_bytes(model, roots, batch), memory_budget)
    total = count * len(groups)
    done = seen = 0
    for group in groups:
        seen = 0
        names = [roots[i] for i in group]
        session = make_session(model, names, options.device)
        samples = itertools.islice(source.samples(), count)
        for feed, n in batched(samples, batch, can_batch):
            results = run_checked(session, names, feed, done)
            for name, value in zip(names, results):
                observers[name].update(value)
            del results
            done += n
            seen += n
            if progress:
                progress("calibrating", done, total)
        del session
    return observers, seen
