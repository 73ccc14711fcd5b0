"""Feeding samples to onnxruntime: batches of equal shapes, and failures as data errors."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort

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
        raise _data_error(exc, feed, index) from None


def run_in_place(session, names: list[str], feed: Sample, index: int) -> list[np.ndarray]:
    """``run_checked`` whose outputs are numpy views of onnxruntime's own buffers (each array
    holds its buffer alive): no copy of the exposed tensors."""
    try:
        inputs = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
        return [v.numpy() for v in session.run_with_ort_values(names, inputs)]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise _data_error(exc, feed, index) from None


def _data_error(exc: Exception, feed: Sample, index: int) -> CalibrationDataError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
    return CalibrationDataError(f"the model fails on calibration sample {index} ({shapes}): {text[-300:]}")
