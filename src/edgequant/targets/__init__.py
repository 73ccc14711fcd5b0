"""Target profiles: the numeric rules of each NPU family, as data.

A profile is a frozen value (``TargetProfile``); one module per vendor defines its profiles
and this package collects them. Nothing outside ``targets/`` branches on a target's name:
the rest of the pipeline reads the profile's fields (dtypes, symmetry, granularity, scheme).
"""

from __future__ import annotations

import dataclasses

from edgequant.errors import ConfigError, closest_names
from edgequant.targets.profile import TargetProfile, Violation, check_model


def _load() -> dict[str, TargetProfile]:
    from edgequant.targets import acuity, espdl, generic, neuropilot, spacemit, tpu_mlir

    out: dict[str, TargetProfile] = {}
    for module in (generic, neuropilot, acuity, espdl, tpu_mlir, spacemit):
        for p in module.PROFILES:
            out[p.name] = p
    return out


PROFILES: dict[str, TargetProfile] = _load()


def get_target(name: str) -> TargetProfile:
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}; did you mean {closest_names(name, list(PROFILES))}? "
                          "(edgequant targets lists them)") from None


#: QuantOptions field → the TargetProfile attribute it takes (``apply_target``).
TARGET_FIELDS = {"activation_dtype": "activation", "activation_symmetric": "activation_symmetric",
                 "weight_dtype": "weight", "weight_symmetric": "weight_symmetric", "per_channel": "per_channel",
                 "scheme": "scheme", "per_channel_ops": "per_channel_ops", "quantize_constants": "constants",
                 "fusions": "fusions", "quantize_all_ops": "quantize_all_ops",
                 "unsigned_nonnegative": "unsigned_nonnegative", "quantize_outputs": "quantize_outputs",
                 "unit_range_ops": "unit_range_ops", "weight_clipping_ratio": "weight_clipping",
                 "tied_inputs": "tied_inputs", "float_output_ops": "float_output_ops",
                 "float_narrow_convs": "float_narrow_convs"}


def apply_target(options, name: str, keep: frozenset[str] = frozenset()):
    """QuantOptions with the profile's rules (explicit options given later still win; ``keep``:
    fields already set explicitly, left as they are)."""
    p = get_target(name)
    return dataclasses.replace(options, target=p.name, **{k: getattr(p, a) for k, a in TARGET_FIELDS.items()
                                                          if k not in keep})


def repair_fallback(profile: TargetProfile) -> str | None:
    """What the default repair (and the statistics protection) moves layers to on
    ``profile``: its ``repair_fallback`` (float for onnxruntime on a host, whose 16-bit
    layers are float kernels behind Q/DQ), else int16, else float; None when it has neither."""
    if profile.repair_fallback in profile.fallback:
        return profile.repair_fallback
    return next((f for f in ("int16", "float") if f in profile.fallback), None)


__all__ = ["PROFILES", "TARGET_FIELDS", "repair_fallback", "TargetProfile", "Violation", "apply_target", "check_model", "get_target"]
