"""Run a model on given inputs and return its outputs, or every intermediate tensor."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from onnx import ModelProto

from edgequant.data.inputs import model_inputs
from edgequant.errors import CalibrationDataError, closest_names
from edgequant.runtime.feed import run_checked
from edgequant.runtime.session import make_session


def match_inputs(model: ModelProto, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for ``model`` from named arrays; a single unnamed array feeds a single-input model."""
    specs = model_inputs(model)
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CalibrationDataError(
            f"no array for model input {missing[0]!r}; the file holds {', '.join(arrays) or 'nothing'} "
            f"(closest: {closest_names(missing[0], list(arrays))})")
    feeds = {}
    for spec in specs:
        arr = np.asarray(arrays[spec.name])
        if arr.dtype != spec.dtype:
            if arr.dtype.kind == spec.dtype.kind or (arr.dtype.kind in "iu" and spec.dtype.kind in "iu"):
                arr = arr.astype(spec.dtype)
            else:
                raise CalibrationDataError(f"input {spec.name!r} is {arr.dtype}, the model takes {spec.dtype}")
        if spec.dtype.kind == "f" and not np.isfinite(arr).all():
            raise CalibrationDataError(f"input {spec.name!r} holds NaN or inf values")
        feeds[spec.name] = arr
    return feeds


def run_model(model: ModelProto, feeds: dict[str, np.ndarray], dump_all: bool = False,
              device: str = "cpu") -> dict[str, np.ndarray]:
    """Graph outputs (and, with ``dump_all``, every top-level tensor in graph order)."""
    outputs = [o.name for o in model.graph.output]
    extra = [o for n in model.graph.node for o in n.output if o and o not in outputs] if dump_all else []
    names = list(dict.fromkeys(extra + outputs))
    sess = make_session(model, names, device=device)
    values = run_checked(sess, names, feeds, 0)
    out = {k: v for k, v in feeds.items()} if dump_all else {}
    out.update({n: np.asarray(v) for n, v in zip(names, values) if isinstance(v, np.ndarray)})
    return out
