"""Turn what the user gave (paths, list files, arrays) into a CalibrationSource."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgequant.data.inputs import InputSettings, InputSpec
from edgequant.data.sources import (
    FILE_TYPES,
    ArraySource,
    CalibrationSource,
    FileListSource,
    NpzSource,
)
from edgequant.data.stream import StreamSource
from edgequant.errors import CalibrationDataError, ConfigError

LIST_SUFFIXES = (".txt", ".lst", ".list")
ALL_SUFFIXES = tuple(s for exts in FILE_TYPES.values() for s in exts)

log = logging.getLogger(__name__)


def _patterns(file_type: str | None) -> tuple[str, ...]:
    return FILE_TYPES[file_type] if file_type else ALL_SUFFIXES


def _read_list(path: Path) -> list[Path]:
    base = path.parent
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    files = [Path(ln) if os.path.isabs(ln) else base / ln for ln in lines if ln and not ln.startswith("#")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CalibrationDataError(f"{path}: {len(missing)} listed file(s) not found, first: {missing[0]}")
    return files


def _list_dir(path: Path, file_type: str | None, any_file: bool = False) -> list[Path]:
    """The folder's files of the type, in name order; the others are named in a warning (a
    ``.tif`` among ``.png`` files is not read, and the user should know)."""
    exts = _patterns(file_type)
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    kept = sorted(p for p in files if any_file or p.suffix.lower() in exts)
    skipped = sorted({p.suffix.lower() or p.name for p in files if p not in kept})
    if skipped and kept:
        count = len(files) - len(kept)
        log.warning("%s: %d file%s skipped (%s): calibration reads %s", path, count, "s" * (count != 1),
                    ", ".join(skipped[:6]) + (" …" if len(skipped) > 6 else ""),
                    ", ".join("*" + e for e in exts))
    return kept


def _files_for(path: Path, spec: InputSpec, st: InputSettings) -> list[Path]:
    if not path.exists():
        raise CalibrationDataError(f"calibration path not found: {path}")
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        files = _read_list(path)
    elif path.is_file():
        files = [path]
    else:
        files = _list_dir(path, st.file_type, any_file=bool(st.preprocess) and not st.file_type)
    if not files:
        pats = ", ".join("*" + e for e in _patterns(st.file_type))
        raise CalibrationDataError(
            f"calibration input {spec.name!r} finds 0 items: looked in {path} for {pats}"
        )
    return files


def _check_type(st: InputSettings) -> None:
    if st.file_type is not None and st.file_type not in FILE_TYPES:
        raise ConfigError(
            f"file_type {st.file_type!r} not implemented; valid: {', '.join(FILE_TYPES)}"
        )


def open_calibration(calib, specs: list[InputSpec], settings: list[InputSettings] | None = None,
                     batch: int = 8, transform_fn: Callable[[Any], Any] | None = None) -> CalibrationSource:
    """Build a source from a path, one path per input, a list file, a list of arrays or dicts,
    or a data object streamed as it is (``data.stream``: a CalibrationDataReader, a DataLoader
    or Dataset, a generator, any iterable; ``transform_fn`` maps each item to the inputs)."""
    settings = settings or [InputSettings() for _ in specs]
    if len(settings) != len(specs):
        raise ConfigError(
            f"calibration input_parametres size ({len(settings)}) should equal the model's "
            f"inputs size ({len(specs)}: {', '.join(s.name for s in specs)})"
        )
    for st in settings:
        _check_type(st)
    if isinstance(calib, CalibrationSource):
        return calib
    paths = _as_paths(calib, settings) if transform_fn is None else None
    if paths is None:
        if isinstance(calib, Sequence) and not isinstance(calib, (str, bytes)) and transform_fn is None:
            return ArraySource(calib, specs)
        return StreamSource(calib, specs, transform_fn)
    if len(paths) == 1 and len(specs) > 1:
        npz = _npz_files(paths[0])
        if npz is not None:
            return NpzSource(npz, specs)
        sub = [paths[0] / s.name for s in specs]
        if all(p.is_dir() for p in sub):
            paths = sub
        else:
            raise CalibrationDataError(
                f"the model has {len(specs)} inputs ({', '.join(s.name for s in specs)}): give .npz "
                f"files keyed by input name, one --calib per input, or sub-folders named after the inputs in {paths[0]}"
            )
    if len(paths) != len(specs):
        raise CalibrationDataError(
            f"{len(paths)} calibration sources for {len(specs)} model inputs; give one per input, in order"
        )
    if len(specs) == 1 and not settings[0].preprocess:
        npz = _npz_files(paths[0])
        if npz is not None and settings[0].file_type in (None, "npz"):
            return NpzSource(npz, specs)
    lists = [_files_for(p, s, st) for p, s, st in zip(paths, specs, settings)]
    return FileListSource(lists, specs, settings, batch)


def _as_paths(calib, settings: list[InputSettings]) -> list[Path] | None:
    given = [st.data_path for st in settings]
    if calib is None:
        if not all(given):
            raise CalibrationDataError(
                "no calibration data: give --calib PATH (or data_list_path for every input in the config)"
            )
        return [Path(p) for p in given if p]
    if isinstance(calib, (str, os.PathLike)):
        return [Path(calib)]
    if isinstance(calib, (list, tuple)) and calib and all(isinstance(c, (str, os.PathLike)) for c in calib):
        return [Path(c) for c in calib]
    return None  # a data object: StreamSource says what it takes


def _npz_files(path: Path) -> list[Path] | None:
    if path.is_file() and path.suffix.lower() == ".npz":
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npz")
        return files or None
    return None


__all__ = ["open_calibration"]
