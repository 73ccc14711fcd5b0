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


def apply_target(options, name: str):
    """QuantOptions with the profile's rules (explicit options given later still win)."""
    p = get_target(name)
    return dataclasses.replace(options, target=p.name, activation_dtype=p.activation,
                               activation_symmetric=p.activation_symmetric, weight_dtype=p.weight,
                               weight_symmetric=p.weight_symmetric, per_channel=p.per_channel, scheme=p.scheme,
                               per_channel_ops=p.per_channel_ops, quantize_constants=p.constants,
                               fusions=p.fusions, quantize_all_ops=p.quantize_all_ops,
                               unsigned_nonnegative=p.unsigned_nonnegative, quantize_outputs=p.quantize_outputs,
                               unit_range_ops=p.unit_range_ops, weight_clipping_ratio=p.weight_clipping,
                               tied_inputs=p.tied_inputs, float_output_ops=p.float_output_ops)


def repair_fallback(profile: TargetProfile) -> str | None:
    """What the default repair (and the statistics protection) moves layers to on
    ``profile``: its ``repair_fallback`` (float for onnxruntime on a host, whose 16-bit
    layers are float kernels behind Q/DQ), else int16, else float; None when it has neither."""
    if profile.repair_fallback in profile.fallback:
        return profile.repair_fallback
    return next((f for f in ("int16", "float") if f in profile.fallback), None)


__all__ = ["PROFILES", "repair_fallback", "TargetProfile", "Violation", "apply_target", "check_model", "get_target"]
