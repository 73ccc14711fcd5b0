"""Feeding samples to onnxruntime: batches of equal shapes, and failures as data errors."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edgequant.data.sources import Sample
from edgequant.errors import CalibrationDataError


def batched(samples: Iterator[Sample], size: int, can_batch: bool) -> Iterator[tuple[Sample, int]]:
    """Stack consecutive samples of equal shapes into batches of up to ``size``.

    Batches never cross a multiple of ``size`` (counted from the first sample), so which
    samples share a batch depends on their indices alone: a shard that starts at a multiple
    of ``size`` batches its samples exactly as one pass over all of them would. A change of
    shape inside a window starts a new batch.
    """
    if not can_batch:
        size = 1
    buf: list[Sample] = []

    def flush() -> tuple[Sample, int]:
        if len(buf) == 1:
            return buf[0], 1
        return {k: np.concatenate([s[k] for s in buf]) for k in buf[0]}, len(buf)

    for i, s in enumerate(samples):
        if buf and (i % size == 0 or any(s[k].shape != buf[0][k].shape for k in s)):
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
