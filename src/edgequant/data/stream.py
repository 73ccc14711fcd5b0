"""Calibration data as users already have it, streamed: an onnxruntime ``CalibrationDataReader``,
a PyTorch ``DataLoader`` or ``Dataset``, a generator, any iterable, with an optional
``transform_fn`` (NNCF's convention) mapping one item to the model's inputs.

Nothing is read into memory as a whole. Calibration passes over the data more than once
(tensor groups, recovery, the fidelity check), so:

* data that can be read again (a ``DataLoader``, a ``Dataset``, a list, a reader with
  ``rewind()``) is read again on every pass;
* data that can be read once (a generator, an iterator, a reader without ``rewind()``) is
  written sample by sample to ``.npy`` files in a temporary folder as it streams, the first
  time anything asks for it, and read back from there; the folder goes with the source.

Items are arrays or tensors (single-input models) or dicts keyed by input name, a batch along
axis 0 where the input has a batch axis. A ``(image, label)`` tuple needs a ``transform_fn``.

Example: ``StreamSource(loader, specs, transform_fn=lambda item: item[0])`` over a DataLoader
of ``(image, label)`` batches of 8 yields each image of each batch as one sample.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgequant.data.inputs import InputSpec
from edgequant.data.sources import CalibrationSource, Sample, _samples_from, checked_item, describe
from edgequant.errors import CalibrationDataError


def is_reader(data: Any) -> bool:
    """An onnxruntime ``CalibrationDataReader`` (or anything with its ``get_next``)."""
    return callable(getattr(data, "get_next", None))


def _reader_items(reader: Any) -> Iterator[Any]:
    while (item := reader.get_next()) is not None:
        yield item


def _indexed(data: Any) -> Iterator[Any]:
    for i in range(len(data)):
        yield data[i]


def rereadable(data: Any) -> bool:
    """Whether ``data`` can be read again from its start: a reader with ``rewind()``, a
    ``Dataset`` (``__getitem__`` and ``__len__``), or an iterable that is no iterator itself (a
    ``DataLoader``, a list); not a generator or an iterator. Nothing is iterated to find out (a
    DataLoader's ``iter()`` starts its workers)."""
    if is_reader(data):
        return callable(getattr(data, "rewind", None))
    if not isinstance(data, Iterable):
        return hasattr(data, "__getitem__") and hasattr(data, "__len__")
    return not isinstance(data, Iterator)


class Spool(CalibrationSource):
    """Samples kept on disk, one ``.npy`` file per input and sample (``k.j.npy``: sample ``k``,
    input ``j`` in the model's order), read back one sample at a time."""

    def __init__(self, folder: tempfile.TemporaryDirectory, specs: list[InputSpec]):
        self._folder = folder  # removed once no source or iterator holds the spool
        self.folder, self.specs, self.count = Path(folder.name), specs, 0

    def __getstate__(self) -> dict:
        """Another process reads the files (the folder stays with this process's spool)."""
        return {k: v for k, v in self.__dict__.items() if k != "_folder"}

    def append(self, sample: Sample) -> None:
        for j, spec in enumerate(self.specs):
            np.save(self.folder / f"{self.count:08d}.{j}.npy", sample[spec.name], allow_pickle=False)
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def _from(self, start: int) -> tuple[int, Iterator[Sample]]:
        return start, self._iter(start)

    def _iter(self, start: int) -> Iterator[Sample]:
        for k in range(start, self.count):
            yield {s.name: np.load(self.folder / f"{k:08d}.{j}.npy", allow_pickle=False)
                   for j, s in enumerate(self.specs)}


class StreamSource(CalibrationSource):
    """Samples from a user's data object, read pass by pass or spooled once (module doc)."""

    def __init__(self, data: Any, specs: list[InputSpec], transform_fn: Callable[[Any], Any] | None = None):
        if data is None or isinstance(data, (str, bytes)) or \
                not (isinstance(data, Iterable) or is_reader(data) or rereadable(data)):
            raise CalibrationDataError(
                f"calibration is {describe(data)}: give a path, a list of paths, a CalibrationDataReader, "
                "a DataLoader or Dataset, a generator, or an iterable of arrays or dicts")
        self.data, self.specs, self.transform = data, specs, transform_fn
        self.again = rereadable(data)
        self._spool: Spool | None = None
        self._count: int | None = None

    def _items(self) -> Iterator[Any]:
        if is_reader(self.data):
            if self.again:
                self.data.rewind()
            return _reader_items(self.data)
        if not isinstance(self.data, Iterable):
            return _indexed(self.data)
        return iter(self.data)

    def _read(self) -> Iterator[Sample]:
        """One pass over the data object itself, item by item, transformed and checked."""
        for j, item in enumerate(self._items()):
            origin = f"calibration item {j}"
            if self.transform is not None:
                try:
                    item = self.transform(item)
                except Exception as exc:
                    raise CalibrationDataError(f"transform_fn failed on {origin} ({describe(item)}): "
                                               f"{type(exc).__name__}: {exc}") from None
            yield from _samples_from(checked_item(item, self.specs, origin), self.specs, origin)

    def spooled(self) -> Spool:
        """The data written once, sample by sample, to ``.npy`` files in a temporary folder."""
        if self._spool is None:
            spool = Spool(tempfile.TemporaryDirectory(prefix="edgequant-calib-"), self.specs)
            for sample in self._read():
                spool.append(sample)
            if not len(spool):
                raise CalibrationDataError("the calibration data yields 0 samples")
            self._spool, self._count = spool, len(spool)
        return self._spool

    def __len__(self) -> int:
        if self._count is None:
            self._count = len(self.spooled()) if not self.again else sum(1 for _ in self._read())
        return self._count

    def _from(self, start: int) -> tuple[int, Iterator[Sample]]:
        if not self.again:
            return self.spooled()._from(start)
        return start, itertools.islice(self._read(), start, None)

    def __getstate__(self) -> dict:
        """Another process reads the spooled files (a data object may not pickle)."""
        return {"specs": self.specs, "spool": self.spooled(), "count": self._count}

    def __setstate__(self, state: dict) -> None:
        self.data, self.transform, self.again = None, None, False
        self.specs, self._spool, self._count = state["specs"], state["spool"], state["count"]


__all__ = ["StreamSource", "is_reader", "rereadable"]
