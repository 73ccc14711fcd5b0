"""Tensor dumps as .npz: read with one-line errors, written atomically and byte-reproducibly."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgequant.errors import CalibrationDataError
from edgequant.ir.model import write_atomic


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an .npz (or one .npy, keyed by its file stem), in file order."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationDataError(f"file not found: {p}")
    try:
        if p.suffix == ".npy":
            return {p.stem: np.load(p, allow_pickle=False)}
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        if p.suffix != ".npy":
            raise unreadable_npz(p, exc) from None
        raise CalibrationDataError(f"cannot read {p} as .npy: {str(exc).splitlines()[0][:200]}") from None


def unreadable_npz(path: Path, exc: Exception) -> CalibrationDataError:
    """The error for an ``.npz`` numpy cannot read, saying why in the user's terms (numpy's own
    message for a file that is no zip suggests ``allow_pickle``, which edgequant never uses)."""
    if not zipfile.is_zipfile(path):
        why = "it is not a zip archive of .npy arrays (truncated, or another format named .npz)"
    elif "pickle" in str(exc):
        why = "it holds Python objects (pickles), which are never loaded; save numeric arrays with np.savez"
    else:
        why = str(exc)
    return CalibrationDataError(f"{path}: not a readable .npz file: {why}")


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` as an uncompressed .npz; same arrays give the same bytes (fixed zip times)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return write_atomic(path, buf.getvalue())
