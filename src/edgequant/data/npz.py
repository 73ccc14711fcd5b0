"""Tensor dumps as .npz: read with one-line errors, written atomically and byte-reproducibly."""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgequant.errors import CalibrationDataError, OutputError


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
        raise CalibrationDataError(f"cannot read {p} as .npz/.npy: {str(exc).splitlines()[0][:200]}") from None


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` as an uncompressed .npz; same arrays give the same bytes (fixed zip times)."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}; create it or choose another -o")
    fd, tmp = tempfile.mkstemp(prefix=".npz-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
                z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
