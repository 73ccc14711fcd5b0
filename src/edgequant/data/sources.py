"""Calibration sources. A source knows its sample count and yields one sample at a time.

A sample is ``{input name: array with batch dim 1}``. Files holding a batch are split. Nothing
is kept after it has been yielded, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import abc
import importlib.util
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgequant.data.images import IMAGE_SUFFIXES, load_image
from edgequant.data.inputs import InputSettings, InputSpec, conform
from edgequant.data.npz import unreadable_npz
from edgequant.errors import CalibrationDataError, ConfigError, not_a_file

FILE_TYPES = {"img": IMAGE_SUFFIXES, "npy": (".npy",), "npz": (".npz",), "raw": (".raw", ".bin")}
Sample = dict[str, np.ndarray]


def _split(spec: InputSpec, arr: np.ndarray) -> Iterator[np.ndarray]:
    n = samples_in(spec, arr.shape)
    if n == 1:
        yield arr
        return
    for i in range(n):
        yield arr[i : i + 1]


class CalibrationSource(abc.ABC):
    """Base: ``len()`` samples and an iterator over them, one sample (batch dim 1) at a time.

    ``samples(start, stop)`` yields samples ``[start, stop)``; sources that know how many
    samples each item or file holds skip whole ones to get there (a shard of the data reads
    its own files only). Sources are picklable, so a shard can be read in another process.
    """

    specs: list[InputSpec]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _from(self, start: int) -> tuple[int, Iterator[Sample]]:
        """(first, samples from index ``first`` on), with ``first ≤ start`` as close as the
        source can skip to without reading."""

    def samples(self, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        first, it = self._from(start)
        return itertools.islice(it, start - first, None if stop is None else max(stop - first, start - first))


def _skip(counts: Iterable[int], start: int) -> tuple[int, int]:
    """(index of the first item holding sample ``start``, samples before it), from per-item
    sample counts; past the end, (number of items, total)."""
    first, k = 0, -1
    for k, n in enumerate(counts):
        if first + n > start:
            return k, first
        first += n
    return k + 1, first


class ArraySource(CalibrationSource):
    """In-memory samples: arrays (single-input models) or dicts keyed by input name."""

    def __init__(self, items: Iterable, specs: list[InputSpec]):
        self.items = items if isinstance(items, Sequence) else list(items)
        self.specs = specs

    def __len__(self) -> int:
        return sum(self._count(item) for item in self.items)

    def _count(self, item) -> int:
        first = item[self.specs[0].name] if isinstance(item, Mapping) else item
        return samples_in(self.specs[0], np.shape(first))

    def _from(self, start: int) -> tuple[int, Iterator[Sample]]:
        k, first = _skip((self._count(item) for item in self.items), start) if start else (0, 0)
        return first, self._iter(k)

    def _iter(self, k: int) -> Iterator[Sample]:
        for j in range(k, len(self.items)):
            origin = f"calibration item {j}"
            yield from _samples_from(checked_item(self.items[j], self.specs, origin), self.specs, origin)


def samples_in(spec: InputSpec, shape: tuple[int, ...]) -> int:
    """How many samples an array of ``shape`` holds for ``spec``.

    Axis 0 enumerates samples when the input's first dim is symbolic, or fixed at 1 while the
    array has more; otherwise (states, scalars, fixed leading dims) the array is one sample.
    """
    if not spec.shape or len(shape) != len(spec.shape):
        return 1
    first = spec.shape[0]
    if first is None or (first == 1 and shape[0] > 1):
        return int(shape[0])
    return 1


#: Item kinds calibration data may hold, for the error that names what came instead.
EXPECTED = "an array or tensor, or a dict keyed by input name"


def describe(item: object) -> str:
    """``a tuple of 2 (Tensor, int)``, ``an int``, ``None``."""
    if item is None:
        return "None"
    name = type(item).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(item, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in item[:4]) + (", …" if len(item) > 4 else "")
        return f"{article} {name} of {len(item)} ({inner})"
    return f"{article} {name}"


def _nested_numbers(item) -> bool:
    """A (nested) list of plain numbers: an array written as Python lists."""
    if isinstance(item, (list, tuple)):
        return bool(item) and all(_nested_numbers(v) for v in item)
    return isinstance(item, (int, float)) and not isinstance(item, bool)


def checked_item(item, specs: list[InputSpec], origin: str):
    """``item`` if it is an array, a tensor or a dict; else an error naming what it is and what
    was expected (a ``(input, label)`` pair: use ``transform_fn``)."""
    if isinstance(item, Mapping) or hasattr(item, "__array__") or hasattr(item, "detach") or _nested_numbers(item):
        return item
    hint = ""
    if isinstance(item, (tuple, list)):
        hint = ("; pass transform_fn= to pick the inputs from each item, e.g. transform_fn=lambda item: item[0] "
                "for (input, label) pairs")
        if len(specs) > 1:
            hint += f", or a dict keyed by {', '.join(s.name for s in specs)}"
    raise CalibrationDataError(f"{origin} is {describe(item)}; expected {EXPECTED}{hint}")


def _samples_from(item, specs: list[InputSpec], origin: str) -> Iterator[Sample]:
    if isinstance(item, Mapping):
        missing = [s.name for s in specs if s.name not in item]
        if missing:
            raise CalibrationDataError(
                f"{origin}: no data for input(s) {', '.join(missing)} (keys: {', '.join(map(str, item))})"
            )
        arrays = {s.name: conform(item[s.name], s, origin) for s in specs}
    else:
        if len(specs) != 1:
            raise CalibrationDataError(
                f"{origin}: the model has {len(specs)} inputs; give dicts or .npz files keyed by "
                f"input name ({', '.join(s.name for s in specs)})"
            )
        arrays = {specs[0].name: conform(item, specs[0], origin)}
    counts = {name: samples_in(spec, arrays[name].shape) for spec in specs for name in [spec.name]}
    per_sample = {name for name, spec in zip(arrays, specs)
                  if spec.shape and (spec.shape[0] is None or counts[name] > 1)}
    sizes = {counts[n] for n in per_sample}
    if len(sizes) > 1:
        detail = ", ".join(f"{n}: {counts[n]}" for n in sorted(per_sample))
        raise CalibrationDataError(f"{origin}: inputs hold different numbers of samples ({detail})")
    n = sizes.pop() if sizes else 1
    for i in range(n):
        yield {k: (v[i : i + 1] if k in per_sample else v) for k, v in arrays.items()}


def _npz_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of one array in an .npz, read from its header without loading the data."""
    try:
        with np.load(path) as z:
            name = key if key in z.files else z.files[0]
            with z.zip.open(name + ".npy") as fh:
                version = np.lib.format.read_magic(fh)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                return tuple(reader(fh)[0])
    except Exception as exc:
        raise unreadable_npz(path, exc) from None


class NpzSource(CalibrationSource):
    """``.npz`` files, keys = input names (a single-input model also accepts any one key)."""

    def __init__(self, files: list[Path], specs: list[InputSpec]):
        self.files, self.specs = files, specs

    def __len__(self) -> int:
        return sum(self._counts())

    def _counts(self) -> Iterator[int]:
        for f in self.files:
            yield samples_in(self.specs[0], _npz_shape(f, self.specs[0].name))

    def _from(self, start: int) -> tuple[int, Iterator[Sample]]:
        k, first = _skip(self._counts(), start) if start else (0, 0)
        return first, self._iter(k)

    def _iter(self, k: int) -> Iterator[Sample]:
        for f in self.files[k:]:
            try:
                with np.load(f) as z:
                    data = {k: z[k] for k in z.files}
            except Exception as exc:
                raise unreadable_npz(f, exc) from None
            if len(self.specs) == 1 and self.specs[0].name not in data and len(data) == 1:
                data = {self.specs[0].name: next(iter(data.values()))}
            yield from _samples_from(data, self.specs, str(f))


class FileListSource(CalibrationSource):
    """One list of files per input (matched by order): npy, raw or images, or a user function."""

    def __init__(self, lists: list[list[Path]], specs: list[InputSpec],
                 settings: list[InputSettings], batch: int = 8):
        counts = [len(x) for x in lists]
        if len(set(counts)) > 1:
            detail = ", ".join(f"{s.name}: {n}" for s, n in zip(specs, counts))
            raise CalibrationDataError(f"calibration inputs have different file counts ({detail}); they must agree")
        self.lists, self.specs, self.settings, self.batch = lists, specs, settings, batch
        self.readers = [_reader_for(lst, s, st) for lst, s, st in zip(lists, specs, settings)]

    def __len__(self) -> int:
        return len(self.lists[0]) if self.lists else 0

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "readers"}  # closures: rebuilt

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.readers = [_reader_for(lst, s, st) for lst, s, st in zip(self.lists, self.specs, self.settings)]

    def _from(self, start: int) -> tuple[int, Iterator[Sample]]:
        if not start or any(st.preprocess for st in self.settings):  # a function's batches: read them
            return 0, self._iter(0)
        k, first = _skip((_samples_in_file(p, self.specs[0], self.settings[0]) for p in self.lists[0]), start)
        return first, self._iter(k)

    def _iter(self, k: int) -> Iterator[Sample]:
        n = len(self)
        for start in range(k, n, self.batch):
            chunk = {}
            for files, spec, read in zip(self.lists, self.specs, self.readers):
                chunk[spec.name] = list(read(files[start : start + self.batch]))
            for j in range(len(chunk[self.specs[0].name])):
                yield {name: arrs[j] for name, arrs in chunk.items()}


Reader = Callable[[list[Path]], Iterator[np.ndarray]]


def _reader_for(files: list[Path], spec: InputSpec, st: InputSettings) -> Reader:
    if st.preprocess:
        fn = load_function(st.preprocess)

        def read_fn(batch: list[Path]) -> Iterator[np.ndarray]:
            origin = f"{st.preprocess} on {batch[0]}"
            try:
                out = fn([str(p) for p in batch], st.as_dict(spec))
            except Exception as exc:
                raise CalibrationDataError(f"preprocess function {st.preprocess} failed: {exc}") from None
            arr = conform(out, spec, origin)
            if arr.shape[0] != len(batch):  # a batch of 4 paths must not silently become 1 sample
                raise CalibrationDataError(
                    f"preprocess function {st.preprocess} returned {arr.shape[0]} sample(s) for {len(batch)} paths "
                    f"(from {batch[0]}); return one sample per path, stacked along axis 0")
            yield from _split(spec, arr)

        return read_fn
    kind = st.file_type or _detect_kind(files)

    def read(batch: list[Path]) -> Iterator[np.ndarray]:
        for p in batch:
            if kind == "npy":
                try:
                    arr = np.load(p, allow_pickle=False)
                except Exception as exc:
                    raise CalibrationDataError(f"{p}: not a readable .npy file ({exc})") from None
            elif kind == "raw":
                arr = _read_raw(p, spec, st)
            else:
                arr = load_image(str(p), spec, st)
            yield from _split(spec, conform(arr, spec, str(p)))

    return read


def _samples_in_file(path: Path, spec: InputSpec, st: InputSettings) -> int:
    """How many samples one file holds, read from its header or size alone."""
    kind = st.file_type or _detect_kind([path])
    if kind == "img":
        return 1
    if kind == "npy":
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except Exception as exc:
            raise CalibrationDataError(f"{path}: not a readable .npy file ({exc})") from None
        return samples_in(spec, shape)
    dims = [d for d in (st.shape or spec.shape)[1:] if d is not None]
    per_sample = int(np.prod(dims)) * np.dtype(spec.dtype).itemsize if dims else np.dtype(spec.dtype).itemsize
    return max(1, path.stat().st_size // per_sample)


def _read_raw(path: Path, spec: InputSpec, st: InputSettings) -> np.ndarray:
    shape = st.shape or spec.shape
    dims = [d for d in shape[1:] if d is not None]
    if len(dims) != len(shape) - 1:
        raise ConfigError(
            f"raw files for input {spec.name!r} need a fixed shape; set input_shape in the config"
        )
    per_sample = int(np.prod(dims)) if dims else 1
    data = np.fromfile(path, dtype=spec.dtype)
    if data.size == 0 or data.size % per_sample:
        raise CalibrationDataError(
            f"{path}: {data.size} {spec.dtype} values do not make whole samples of shape "
            f"{list(shape[1:])} for input {spec.name!r}"
        )
    return data.reshape([-1, *dims])


def _detect_kind(files: list[Path]) -> str:
    suffixes = {p.suffix.lower() for p in files}
    for kind, exts in FILE_TYPES.items():
        if suffixes and suffixes <= set(exts):
            return kind
    raise ConfigError(
        f"cannot tell the file type of {', '.join(sorted(suffixes))} files; set file_type to one of "
        f"{', '.join(FILE_TYPES)}"
    )


def load_function(spec: str) -> Callable:
    """Import ``path/to/file.py:function`` and return the function."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ConfigError(f"preprocess_file must look like 'path/to/file.py:function', got {spec!r}")
    if not os.path.isfile(path):
        raise ConfigError(not_a_file("preprocess", path))
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import preprocess file {path}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"cannot import preprocess file {path}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{path} has no function {name!r}")
    return fn
