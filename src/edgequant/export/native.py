"""edgequant's own parameter file: the whole plan and every tensor's parameters, as JSON.

It re-creates the quantized model from the float model without calibration data
(``recreate``): same plan, same activation parameters; weights are re-quantized from the
float weights and checked against the scales in the file, so a file applied to another model
is refused rather than silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter

import numpy as np
from onnx import ModelProto, numpy_helper

from edgequant.errors import ConfigError, malformed
from edgequant.ir.model import load_model, opset_of
from edgequant.pipeline import prepare
from edgequant.planning.options import QuantOptions
from edgequant.planning.plan import ActivationPlan, BiasPlan, QuantPlan, WeightPlan
from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import QuantParams, Scheme
from edgequant.result import QuantizeResult, Summary, stamp
from edgequant.transform.qdq import insert_qdq

FORMAT = "edgequant-params"
VERSION = 1


def _scheme(s: Scheme) -> dict:
    return dataclasses.asdict(s)


def _list(a) -> list | float | int:
    arr = np.asarray(a)
    return arr.tolist()


def dumps(result) -> str:
    plan: QuantPlan = result.plan
    weights = _weight_params(result.model)
    data = {
        "format": FORMAT, "version": VERSION,
        "model": {"opset": result.summary.opset[1], "simplify": result.options.simplify,
                  "nodes": len(result.float_model.graph.node), "target": result.options.target},
        "activations": [{"tensor": a.tensor, "root": a.root, "source": a.source, "dtype": a.dtype.value,
                         "symmetric": a.symmetric, "scheme": _scheme(a.scheme)} for a in plan.activations.values()],
        "params": {root: {"scale": _list(p.scale), "zero_point": _list(p.zero_point), "dtype": p.dtype.value}
                   for root, p in result.params.items()},
        "weights": [{"node": k[0], "slot": k[1], "tensor": w.tensor, "dtype": w.dtype.value, "symmetric": w.symmetric,
                     "axis": w.axis, "scheme": _scheme(w.scheme), **({"clipping": w.clipping} if w.clipping else {}),
                     **weights.get((k[0], k[1]), {})}
                    for k, w in plan.weight_items()],
        "biases": [{"node": k[0], "slot": k[1], "tensor": b.tensor, "input": b.input_tensor} for k, b in plan.bias_items()],
        "folded": plan.folded_nodes, "precision": plan.precision,
        "quantized_ops": dict(plan.quantized_ops), "float_ops": dict(plan.float_ops),
        "subgraph_float_ops": plan.subgraph_float_ops,
    }
    return json.dumps(data, indent=1) + "\n"


def _weight_params(qmodel: ModelProto) -> dict[tuple[str, int], dict]:
    """(node, slot) → scale/zero point of the weight DequantizeLinear feeding it."""
    inits = {t.name: t for t in qmodel.graph.initializer}
    prod = {o: n for n in qmodel.graph.node for o in n.output}
    out = {}
    for node in qmodel.graph.node:
        for slot, name in enumerate(node.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            if inits[dq.input[0]].data_type == 6:
                continue
            out[(node.name, slot)] = {"scale": _list(numpy_helper.to_array(inits[dq.input[1]])),
                                      "zero_point": _list(numpy_helper.to_array(inits[dq.input[2]]))}
    return out


def _read(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"parameter file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an edgequant parameter file (format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ConfigError(f"{path} has version {data.get('version')}; this edgequant reads version {VERSION}")
    return data


def _dtype(name: object, path) -> QuantDType:
    try:
        return QuantDType(name)
    except ValueError:
        raise ConfigError(f"{path}: unknown dtype {name!r}; use one of {', '.join(d.value for d in QuantDType)}") from None


def _params(root: str, p: dict, path) -> QuantParams:
    """One root's scale and zero point, the zero point within its dtype's range."""
    dtype = _dtype(p["dtype"], path)
    zp = np.asarray(p["zero_point"])
    if zp.dtype.kind not in "iu" or zp.size == 0 or zp.min() < dtype.qmin or zp.max() > dtype.qmax:
        raise ConfigError(f"{path}: the zero point of {root} is {zp.reshape(-1)[:4].tolist()}; a {dtype.value} zero "
                          f"point is an integer in [{dtype.qmin}, {dtype.qmax}]")
    return QuantParams(np.asarray(p["scale"], np.float32), zp.astype(dtype.np_dtype), dtype)


def _plan(data: dict, path: object = "the file") -> QuantPlan:
    plan = QuantPlan()
    for a in data["activations"]:
        plan.activations[a["tensor"]] = ActivationPlan(a["tensor"], a["root"], a["source"], _dtype(a["dtype"], path),
                                                       a["symmetric"], Scheme(**a["scheme"]))
    for w in data["weights"]:
        plan.weights.setdefault(w["node"], {})[w["slot"]] = WeightPlan(
            w["tensor"], _dtype(w["dtype"], path), w["symmetric"], w["axis"], Scheme(**w["scheme"]), w.get("clipping"))
    for b in data["biases"]:
        wp = next(iter(plan.weights[b["node"]].values()))
        plan.biases.setdefault(b["node"], {})[b["slot"]] = BiasPlan(b["tensor"], b["input"], wp)
    plan.folded_nodes = dict(data["folded"])
    plan.precision = dict(data["precision"])
    plan.quantized_ops, plan.float_ops = Counter(data["quantized_ops"]), Counter(data["float_ops"])
    plan.subgraph_float_ops = data["subgraph_float_ops"]
    return plan


def recreate(model: str | os.PathLike | ModelProto, path: str | os.PathLike) -> QuantizeResult:
    """The quantized model the file describes, from ``model`` (float), without calibration."""
    start = time.perf_counter()
    data = _read(path)
    # the file fixes the opset (per_channel=False asks for no upgrade of its own)
    with malformed(path, "edgequant parameter"):
        options = QuantOptions(target=data["model"]["target"], simplify=data["model"]["simplify"], per_channel=False)
    prepared = prepare(load_model(model), options, data["model"]["opset"])
    names = {n.name for n in prepared.model.graph.node}
    tensors = {i.name for i in prepared.model.graph.input} | {o for n in prepared.model.graph.node for o in n.output}
    with malformed(path, "edgequant parameter"):
        plan = _plan(data, path)
        params = {r: _params(r, p, path) for r, p in data["params"].items()}
    missing = [n for n in plan.weights if n not in names] + [t for t in plan.activations if t not in tensors]
    if missing or len(prepared.model.graph.node) != data["model"]["nodes"]:
        raise ConfigError(f"{path} was made for another model ({missing[0] if missing else 'node count differs'} "
                          "is not in this one)")
    for root, p in params.items():
        if not (np.all(np.isfinite(p.scale)) and np.all(p.scale > 0)):
            raise ConfigError(f"{path}: the scale of {root} is {p.scale.reshape(-1)[:4].tolist()}; scales must be finite "
                              "and positive (this file would quantize the tensor to nothing)")
    qmodel = stamp(insert_qdq(prepared.model, plan, params))
    with malformed(path, "edgequant parameter"):
        _check_weights(qmodel, data, path)
    ranges = {a.root: (float("nan"), float("nan")) for a in plan.activations.values()}
    summary = Summary(dict(plan.quantized_ops), dict(plan.float_ops), plan.subgraph_float_ops, 0, 0, False, 0.0,
                      time.perf_counter() - start, (prepared.from_opset, opset_of(qmodel)), prepared.passes,
                      notes=[f"parameters from {path}; no calibration"], precision=dict(plan.precision))
    return QuantizeResult(qmodel, prepared.model, plan, ranges, params, summary, prepared.options, prepared.source)


def _check_weights(qmodel: ModelProto, data: dict, path) -> None:
    got = _weight_params(qmodel)
    for w in data["weights"]:
        have = got.get((w["node"], w["slot"]))
        if have is None or "scale" not in w:
            continue
        if not np.allclose(np.asarray(have["scale"]), np.asarray(w["scale"]), rtol=1e-6):
            raise ConfigError(f"{path}: the weights of {w['node']} differ from those the file was made from; "
                              "use the float model it came from")
