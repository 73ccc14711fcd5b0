"""Compare two tensor dumps (.npz) by name, the TPU-MLIR ``npz_tool.py compare`` way.

A tensor passes when its cosine similarity and its Euclidean similarity
(``1 − ‖a − b‖ / ‖(a + b)/2‖``) both reach the tolerance; integer tensors pass when equal, and
so do strings (no metrics). A NaN or an infinity fails, even against the same value.
Tensors whose names appear in one dump only are listed, not failed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edgequant.analysis.metrics import Metrics, compare
from edgequant.errors import ConfigError

DEFAULT_TOLERANCE = (0.99, 0.90)
#: (cosine, Euclidean) by what is compared: float against float, or float against int8, where
#: every tensor carries its rounding (TPU-MLIR's users compare int8 dumps at about 0.85, 0.45)
PRESETS = {"float": DEFAULT_TOLERANCE, "int8": (0.85, 0.45)}


@dataclass(frozen=True)
class TensorComparison:
    name: str
    shape: tuple[int, ...]
    status: str  # "equal", "similar", "not similar", "not equal", "shape differs"
    metrics: Metrics | None

    @property
    def passed(self) -> bool:
        return self.status in ("equal", "similar")


@dataclass
class DumpComparison:
    rows: list[TensorComparison] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


def parse_tolerance(text: str) -> tuple[float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or not all(-1.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"tolerance {text!r} must be COSINE,EUCLIDEAN, two numbers in [-1, 1] (e.g. 0.99,0.90)")
    return values[0], values[1]


def _one(name: str, a: np.ndarray, b: np.ndarray, tol: tuple[float, float]) -> TensorComparison:
    if a.shape != b.shape:
        if a.size == b.size:  # same data laid out differently (e.g. a kept batch axis)
            b = b.reshape(a.shape)
        else:
            return TensorComparison(name, a.shape, "shape differs", None)
    if a.dtype.kind not in "biuf" or b.dtype.kind not in "biuf":  # strings, objects: equal or not, no metrics
        same = a.dtype.kind == b.dtype.kind and np.array_equal(a, b)
        return TensorComparison(name, a.shape, "equal" if same else "not equal", None)
    if np.array_equal(a, b) and np.isfinite(a).all():  # NaN is never equal, not even to NaN
        return TensorComparison(name, a.shape, "equal", compare(a.astype(np.float32), b.astype(np.float32)))
    m = compare(a.astype(np.float32), b.astype(np.float32))
    if a.dtype.kind not in "f" and b.dtype.kind not in "f":
        return TensorComparison(name, a.shape, "not equal", m)
    # a NaN/inf on either side is a mismatch (the fidelity metrics leave out what the reference lacks)
    nonfinite = int(np.count_nonzero(~np.isfinite(a)) + np.count_nonzero(~np.isfinite(b)))
    m = dataclasses.replace(m, nonfinite=max(m.nonfinite, nonfinite))
    ok = m.nonfinite == 0 and m.cosine >= tol[0] and m.euclidean >= tol[1]
    return TensorComparison(name, a.shape, "similar" if ok else "not similar", m)


def compare_dumps(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                  tolerance: tuple[float, float] = DEFAULT_TOLERANCE,
                  excepts: Iterable[str] = ()) -> DumpComparison:
    """Compare tensors present in both dumps (in ``a``'s order); ``excepts`` are names or globs."""
    patterns = [e for e in excepts if e]
    result = DumpComparison()
    for name in a:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            result.skipped.append(name)
        elif name not in b:
            result.only_a.append(name)
        else:
            result.rows.append(_one(name, np.asarray(a[name]), np.asarray(b[name]), tolerance))
    result.only_b = [n for n in b if n not in a and not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return result
