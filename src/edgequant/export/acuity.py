"""Acuity ``customized_quantize_layers:`` YAML (the ``.quantize`` file's hybrid section)::

    customized_quantize_layers:
      Conv_12: dynamic_fixed_point-i16
      Sigmoid_3: float32

Names are edgequant's node names. Types: ``asymmetric_affine-u8``,
``perchannel_symmetric_affine-i8``, ``dynamic_fixed_point-i8``/``-i16``, ``float32``,
``float16``/``bfloat16`` (as float).
"""

from __future__ import annotations

import yaml

from edgequant.errors import ConfigError
from edgequant.planning.overrides import FLOAT, Override
from edgequant.quant.dtypes import QuantDType

_TYPES: dict[str, tuple[QuantDType | str, bool | None]] = {
    "asymmetric_affine-u8": (QuantDType.UINT8, False), "asymmetric_affine-u16": (QuantDType.UINT16, False),
    "perchannel_symmetric_affine-i8": (QuantDType.INT8, True), "symmetric_affine-i8": (QuantDType.INT8, True),
    "dynamic_fixed_point-i8": (QuantDType.INT8, True), "dynamic_fixed_point-i16": (QuantDType.INT16, True),
    "float32": (FLOAT, None), "float16": (FLOAT, None), "bfloat16": (FLOAT, None),
}


def _type_of(dtype: QuantDType, symmetric: bool, pow2: bool) -> str:
    if dtype.bits == 16:
        return "dynamic_fixed_point-i16" if pow2 or symmetric else "asymmetric_affine-u16"
    if pow2:
        return "dynamic_fixed_point-i8"
    return "perchannel_symmetric_affine-i8" if symmetric else "asymmetric_affine-u8"


def dumps(result) -> str:
    layers = {}
    for node in result.float_model.graph.node:
        inputs = [result.plan.activations[t] for t in node.input if t in result.plan.activations]
        if node.name in result.plan.precision and result.plan.precision[node.name].startswith("float"):
            layers[node.name] = "float32"
        elif inputs:
            a = inputs[0]
            layers[node.name] = _type_of(a.dtype, a.symmetric, a.scheme.power_of_two)
    return yaml.safe_dump({"customized_quantize_layers": layers}, sort_keys=False, allow_unicode=True)


def loads(text: str, origin: str = "acuity") -> tuple[Override, ...]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {str(exc).splitlines()[0]}") from None
    layers = data.get("customized_quantize_layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict):
        raise ConfigError(f"{origin} has no customized_quantize_layers: mapping")
    out = []
    for name, kind in layers.items():
        if str(kind) not in _TYPES:
            raise ConfigError(f"{origin}: layer {name!r} has type {kind!r}; use one of {', '.join(_TYPES)}")
        dtype, sym = _TYPES[str(kind)]
        out.append(Override(str(name), dtype, symmetric=sym))
    return tuple(out)
