"""NeuroPilot qparams JSON (``export_qparams_config_file`` / ``import_qparams_config_file``)::

    {"version": "v1", "quantization_params": [{"activations": {
        NAME: {"dtype": "UINT8", "is_symmetric": false, "min_vals": -6.0, "max_vals": 6.5},
        NAME: {"dtype": "FP"}}}]}

Import: ``"FP"`` keeps that tensor float; a dtype sets it; min/max pin its range.
"""

from __future__ import annotations

import json

from edgequant.errors import ConfigError, malformed
from edgequant.planning.overrides import FLOAT, Override
from edgequant.planning.selectors import ExactTensor
from edgequant.quant.dtypes import QuantDType

_NAMES = {QuantDType.UINT8: "UINT8", QuantDType.INT8: "INT8", QuantDType.UINT16: "UINT16", QuantDType.INT16: "INT16"}


def dumps(result) -> str:
    acts = {}
    for name, a in result.plan.activations.items():
        lo, hi = result.ranges[a.root]
        acts[name] = {"dtype": _NAMES[a.dtype], "is_symmetric": a.symmetric, "min_vals": float(lo), "max_vals": float(hi)}
    return json.dumps({"version": "v1", "quantization_params": [{"activations": acts}]}, indent=4) + "\n"


def loads(text: str, origin: str = "qparams") -> tuple[Override, ...]:
    try:
        data = json.loads(text)
        groups = data["quantization_params"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{origin} is not a qparams file (version, quantization_params[].activations): {exc}") from None
    out = []
    with malformed(origin, "qparams"):
        for group in groups:
            for name, entry in (group.get("activations") or {}).items():
                out.append(_entry(name, entry, origin))
    return tuple(out)


def _entry(name: str, entry: dict, origin: str) -> Override:
    dtype = str(entry.get("dtype", "")).upper()
    if dtype in ("FP", "FP32", "FLOAT", "FLOAT32", "FP16"):
        return Override(ExactTensor(name), FLOAT)
    wanted = {v: k for k, v in _NAMES.items()}.get(dtype)
    if wanted is None:
        raise ConfigError(f"{origin}: {name!r} has dtype {entry.get('dtype')!r}; use UINT8, INT8, UINT16, INT16 or FP")
    rng = None
    if "min_vals" in entry and "max_vals" in entry:
        lo, hi = float(_scalar(entry["min_vals"])), float(_scalar(entry["max_vals"]))
        if not lo <= hi:
            raise ConfigError(f"{origin}: {name!r} has min_vals {lo} > max_vals {hi}")
        rng = (lo, hi)
    sym = entry.get("is_symmetric")
    return Override(ExactTensor(name), wanted, range=rng, symmetric=None if sym is None else bool(sym))


def _scalar(v):
    return v[0] if isinstance(v, list) and len(v) == 1 else v
