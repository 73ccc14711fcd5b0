"""Typed, actionable errors. Every message names the offending thing and how to fix it."""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterable
from pathlib import Path


class EdgequantError(Exception):
    """Base class of every error edgequant raises on bad input."""

    exit_code = 2


class ModelLoadError(EdgequantError):
    """The model file is missing, not ONNX, or corrupt."""


class ConfigError(EdgequantError):
    """A configuration key or value is wrong."""


class NotYetSupportedError(ConfigError):
    """A configuration key names a feature that is not available in this version."""


class CalibrationDataError(EdgequantError):
    """Calibration data is missing, empty, of the wrong shape/dtype, or not finite."""


class TensorNameError(ConfigError):
    """A tensor or input name that the model does not have."""


class OutputError(EdgequantError):
    """The output path cannot be written."""


def closest_names(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return a ``did you mean`` hint listing the candidates closest to ``name``."""
    pool = list(candidates)
    close = difflib.get_close_matches(name, pool, n=n, cutoff=0.3)
    if not close:
        close = pool[:n]
    return ", ".join(repr(c) for c in close)


def not_a_file(kind: str, path: str | os.PathLike) -> str:
    """The message for a ``kind`` path (``model``, ``config``…) that names no file: a folder,
    or nothing."""
    p = Path(path)
    if p.is_dir():
        return f"{kind} {p} is a folder, not a file; give the {kind} file itself"
    return f"{kind} file not found: {p}"


def read_text(path: Path, kind: str) -> str:
    """A text file edgequant reads (config, overrides, parameters) as UTF-8, or one line why not."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{kind} file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def parse_guarded(parse, path: Path, kind: str):
    """``parse()`` of a file's text, with what Python's parsers refuse said in a user's terms:
    nesting deeper than they recurse, integers of more digits than they convert."""
    try:
        return parse()
    except RecursionError:
        raise ConfigError(f"{kind} file {path} is nested too deeply to read; flatten it") from None
    except ValueError as exc:
        if "digits" in str(exc) and "integer" in str(exc):
            raise ConfigError(f"{kind} file {path} holds an integer with thousands of digits; give a plain "
                              "number") from None
        raise


@contextlib.contextmanager
def malformed(path: str | os.PathLike, kind: str):
    """Reading a parsed ``kind`` file: a missing key or a value of the wrong type or out of
    range becomes one line naming the file (what is missing, or what Python said)."""
    try:
        yield
    except KeyError as exc:
        raise ConfigError(f"{path}: malformed {kind} file: no {exc} key where one belongs; re-export it") from None
    except (TypeError, AttributeError, ValueError, OverflowError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: malformed {kind} file: a value of the wrong type or range ({first})") from None
