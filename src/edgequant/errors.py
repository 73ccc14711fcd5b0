"""Typed, actionable errors. Every message names the offending thing and how to fix it."""

from __future__ import annotations

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
