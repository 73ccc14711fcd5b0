"""Per-layer overrides: keep chosen layers in 16-bit or float, or calibrate them differently.

An override is ``SELECTOR=SPEC``; SELECTOR is described in ``planning.selectors`` (node name,
glob, ``re:``, ``op:``, ``tensor:``; subgraphs and regions come from the config and CLI).
SPEC is a comma-separated list of a precision and ``key=value`` items::

    Conv_12=int16                  activations read by Conv_12 in int16
    op:Softmax=float               every Softmax in float
    re:head/=int16,weight=int16    16-bit activations and weights
    tensor:logits=uint16           one tensor (and those sharing its parameters)
    op:Sigmoid=method=minmax       calibration method for the inputs of every Sigmoid
    op:Add=percentile=99.9         (percentile implies method=percentile)
    re:decoder=level=2             a precision level (see PRECISION_LEVELS)

Rules, applied to the plan in order (a later override wins):

* an activation dtype applies to the node's quantized input activations; tensors that share
  parameters (a MaxPool output and its input...) share the dtype, so the whole group changes.
  Weights keep their dtype unless ``weight=`` is given;
* ``float`` leaves the node's input activations, weights and bias unquantized. Other readers
  of those activations read them in float too (one Q/DQ pair per tensor in QDQ models);
* ``method``/``percentile`` choose how the input activations' ranges are calibrated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

from onnx import GraphProto, ModelProto, NodeProto

from edgequant.calibration.method import Method
from edgequant.errors import ConfigError
from edgequant.ir.graph import GraphIndex
from edgequant.planning.selectors import NamePattern, Selector
from edgequant.quant.dtypes import QuantDType

FLOAT = "float"

PRECISION_LEVELS = {
    0: "int8 everywhere (the default activation and weight dtypes)",
    1: "int8, with 16-bit activations for ops known to be sensitive (normalisation, Softmax, Log/Exp, "
       "Sqrt/Reciprocal/Div/Pow, reductions, squares)",
    2: "16-bit activations, 8-bit weights",
    3: "16-bit activations and weights",
    4: "float",
}
SENSITIVE_OPS = {"Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
                 "Log", "Exp", "Sqrt", "Reciprocal", "Div", "Pow", "Erf", "ReduceMean", "ReduceSum",
                 "ReduceSumSquare", "ReduceL2"}


@dataclass(frozen=True)
class Override:
    """What to change for the nodes (or tensors) ``selector`` picks; ``None`` leaves a field be."""

    selector: Selector | str  # a Selector of planning.selectors; text becomes a NamePattern
    precision: QuantDType | str | None = None
    weight: QuantDType | None = None
    method: Method | None = None
    percentile: float | None = None
    level: int | None = None
    range: tuple[float, float] | None = None  # pin the calibrated range (imported parameter files)
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.selector, str):
            object.__setattr__(self, "selector", NamePattern(self.selector))
        if self.level is not None and self.level not in PRECISION_LEVELS:
            raise ConfigError(f"precision_level {self.level} is not one of 0–4 (0 int8 … 4 float)")
        if self.percentile is not None and not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"override {self}: percentile must be in (50, 100], got {self.percentile}")
        if self.range is not None:
            lo, hi = self.range
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                raise ConfigError(f"{self.selector}: range [{lo}, {hi}] must be finite with min ≤ max (a NaN, an "
                                  "infinite or a reversed range would quantize the tensor to nothing)")

    @classmethod
    def parse(cls, text: str) -> Override:
        selector, sep, spec = text.partition("=")
        if not sep or not selector.strip() or not spec.strip():
            raise ConfigError(f"override {text!r} must read SELECTOR=PRECISION, e.g. Conv_12=int16 or op:Softmax=float")
        fields: dict = {}
        for item in (s.strip() for s in spec.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                key, value = "precision", item
            fields[key.strip()] = _field(key.strip(), value.strip(), text)
        if fields.get("percentile") is not None and "method" not in fields:
            fields["method"] = Method.PERCENTILE
        return cls(selector.strip(), **fields)

    def __str__(self) -> str:
        parts = []
        if self.precision is not None:
            parts.append(_name(self.precision))
        for key in ("weight", "method", "percentile", "level"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={_name(value)}")
        return f"{self.selector}={','.join(parts)}"


def _name(value) -> str:
    return str(getattr(value, "value", value))


def _field(key: str, value: str, text: str):
    if key == "precision":
        return parse_precision(value)
    if key == "weight":
        dtype = QuantDType.parse(value)
        if dtype not in (QuantDType.INT8, QuantDType.UINT8, QuantDType.INT16, QuantDType.UINT16, QuantDType.INT4,
                         QuantDType.UINT4):
            raise ConfigError(f"override {text!r}: weight must be int4, uint4, int8, uint8, int16 or uint16")
        return dtype
    if key == "method":
        return Method.parse(value)
    if key in ("percentile", "level"):
        try:
            return float(value) if key == "percentile" else int(value)
        except ValueError:
            raise ConfigError(f"override {text!r}: {key} must be a number, got {value!r}") from None
    raise ConfigError(f"override {text!r}: unknown item {key!r}; use a precision, weight=, method=, percentile= or level=")


def parse_precision(text: str) -> QuantDType | str:
    if text.lower() in ("float", "fp32", "float32", "fp"):
        return FLOAT
    try:
        dtype = QuantDType.parse(text)
    except ConfigError:
        dtype = None
    if dtype is None or dtype.bits == 4:
        raise ConfigError(f"precision {text!r} is not one of int8, uint8, int16, uint16, float "
                          "(4-bit is for weights: weight=int4)")
    return dtype


def _hops(start: list[str], step, limit: int) -> set[str]:
    """Node names reachable from ``start`` tensors within ``limit`` nodes; ``step(tensor)``
    gives (nodes, next tensors of each)."""
    seen: set[str] = set()
    frontier = list(start)
    for _ in range(limit):
        nxt = []
        for t in frontier:
            for node, tensors in step(t):
                if node.name not in seen:
                    seen.add(node.name)
                    nxt += tensors
        frontier = nxt
    return seen


def sensitive_nodes(model: ModelProto, reach: int = 6) -> set[str]:
    """Nodes precision level 1 keeps in 16-bit: SENSITIVE_OPS; squares ``Mul(x, x)`` and the
    node computing ``x``; the nodes that read a Sqrt/Reciprocal/Div output; and the statistics
    path of a decomposed normalisation — nodes within ``reach`` steps after a reduction and
    before a Sqrt/Reciprocal (mean, E[x²] − E[x]², + eps…), where int8 loses everything to
    cancellation."""
    nodes = list(model.graph.node)
    prod = {o: n for n in nodes for o in n.output}
    names = {n.name for n in nodes if n.op_type in SENSITIVE_OPS}
    scaled = {o for n in nodes if n.op_type in ("Sqrt", "Reciprocal", "Div") for o in n.output}
    for n in nodes:
        if n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1]:
            names.add(n.name)
            if n.input[0] in prod:
                names.add(prod[n.input[0]].name)
        if any(i in scaled for i in n.input):
            names.add(n.name)
    return names | statistics_path(nodes, reach)


def statistics_path(nodes: list[NodeProto], reach: int = 6) -> set[str]:
    """The statistics of decomposed normalisations: nodes within ``reach`` steps after a
    reduction and before a Sqrt/Reciprocal (mean, x − mean, its square, E[x²], + eps), where
    8 bits lose everything to cancellation (magika's layer norms: top-1 0.07 at int8)."""
    prod = {o: n for n in nodes for o in n.output}
    cons: dict[str, list[NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    reductions = [o for n in nodes if n.op_type.startswith("Reduce") for o in n.output]
    after = _hops(reductions, lambda t: [(c, list(c.output)) for c in cons.get(t, [])], reach)
    roots = [i for n in nodes if n.op_type in ("Sqrt", "Reciprocal") for i in n.input]
    before = _hops(roots, lambda t: [(prod[t], list(prod[t].input))] if t in prod else [], reach)
    return after & before


def apply_overrides(plan, model: ModelProto, overrides: Iterable[Override], options,
                    source: GraphProto | None = None) -> None:
    """Change ``plan`` (a QuantPlan) in place as the overrides say; see the module rules.

    Linear in the graph: one index of the graph, one table of parameter-sharing groups, and
    plan entries looked up by node name.
    """
    index = GraphIndex(model.graph)
    index.source = source  # the user's graph before the passes: names parameter files may use
    edit = _PlanEdit(plan, index, keep_inputs=getattr(options, "quantize_all_ops", False))
    sensitive: set[str] | None = None
    for ov in overrides:
        selector = NamePattern(ov.selector) if isinstance(ov.selector, str) else ov.selector
        if getattr(selector, "tensors", None) is True:  # NamePattern tensor:…, ExactTensor, a file's tensor names
            for t in selector.select_tensors(index, list(plan.activations)):  # type: ignore[attr-defined]
                edit.tensors([t], ov.precision, ov)
            continue
        for node in selector.select(index):
            act, weight = ov.precision, ov.weight
            if ov.level is not None:
                if ov.level == 1 and sensitive is None:
                    sensitive = sensitive_nodes(model)
                act, weight = _level(ov.level, node, options, sensitive or set())
                act, weight = ov.precision or act, ov.weight or weight
            inputs = [t for t in dict.fromkeys(node.input) if t in plan.activations]
            if act == FLOAT:
                edit.keep_float(node, inputs)
            else:
                edit.tensors(inputs, act, ov)
                if weight is not None:
                    slots = plan.weights.get(node.name, {})
                    for slot, wp in slots.items():
                        slots[slot] = dataclasses.replace(wp, dtype=weight)
            if act is not None or weight is not None:
                plan.precision[node.name] = ",".join(_name(v) for v in (act, weight) if v is not None)
    if edit.keep_inputs:
        edit.drop_between_float_layers()
    edit.drop_orphan_biases()


def _level(level: int, node: NodeProto, options, sensitive: set[str]):
    if level == 0:
        return options.activation_dtype, options.weight_dtype
    if level == 1:
        return (QuantDType.INT16 if node.name in sensitive else None), None
    if level == 2:
        return QuantDType.INT16, None
    if level == 3:
        return QuantDType.INT16, QuantDType.INT16
    return FLOAT, None


class _PlanEdit:
    """Edits of one plan: dtype, symmetry, range and method changes by parameter-sharing group,
    activations and layers left float."""

    def __init__(self, plan, index: GraphIndex, keep_inputs: bool = False):
        self.plan, self.index = plan, index
        self.members = plan.members()  # root → tensors sharing its parameters
        # a layer left float still reads quantized inputs (a chip that quantizes every op, as
        # TPU-MLIR: its producer runs in int8 and the float layer casts what it reads)
        self.keep_inputs = keep_inputs

    def tensors(self, tensors: list[str], act, ov: Override) -> None:
        plan = self.plan
        if act == FLOAT:
            for t in tensors:
                self.drop_activation(t)
            return
        roots = list(dict.fromkeys(plan.activations[t].root for t in tensors if t in plan.activations))
        for root in roots:
            for name in self.members.get(root, ()):
                a = plan.activations.get(name)
                if a is None:
                    continue
                if act is not None:
                    a = dataclasses.replace(a, dtype=act)
                if ov.symmetric is not None:
                    a = dataclasses.replace(a, symmetric=ov.symmetric)
                plan.activations[name] = a
            if ov.range is not None:
                plan.pinned[root] = ov.range
            if ov.method is not None:
                before = plan.calibration.get(root, (None, None))[1]
                plan.calibration[root] = (ov.method, ov.percentile if ov.percentile is not None else before)

    def keep_float(self, node: NodeProto, inputs: list[str]) -> None:
        plan = self.plan
        was_quantized = node.name in plan.weights or bool(inputs)
        for t in inputs:
            if not self.keep_inputs or t not in self.index.producers:  # a graph input arrives in float
                self.drop_activation(t)
        plan.weights.pop(node.name, None)
        plan.biases.pop(node.name, None)
        if was_quantized and plan.quantized_ops.get(node.op_type):
            _count(plan.quantized_ops, node.op_type, -1)
            plan.float_ops[node.op_type] += 1

    def drop_between_float_layers(self) -> None:
        """With ``keep_inputs``: a tensor that one float layer writes and another reads stays
        float (the chip hands it over without a cast)."""
        plan = self.plan
        floats = {n for n, p in plan.precision.items() if p.split(",")[0] == "float"}
        for name in floats:
            node = self.index.by_name.get(name)
            for t in node.input if node is not None else []:
                prod = self.index.producers.get(t)
                if prod is not None and prod.name in floats and t in plan.activations:
                    self.drop_activation(t)

    def drop_activation(self, t: str) -> None:
        plan = self.plan
        if plan.activations.pop(t, None) is None:
            return
        relu = self.index.producers.get(t)
        if relu is not None and relu.name in plan.folded_nodes:  # the Relu runs again, in float
            del plan.folded_nodes[relu.name]
            _count(plan.quantized_ops, f"{relu.op_type} (folded)", -1)
            plan.float_ops[relu.op_type] += 1

    def drop_orphan_biases(self) -> None:
        """A bias becomes int32 with the input's scale; without a quantized input it stays float."""
        plan = self.plan
        for node in list(plan.biases):
            slots = plan.biases[node]
            for slot in [k for k, bp in slots.items() if bp.input_tensor not in plan.activations
                         or node not in plan.weights]:
                del slots[slot]
            if not slots:
                del plan.biases[node]


def _count(counter, key: str, delta: int) -> None:
    counter[key] += delta
    if counter[key] <= 0:
        del counter[key]
