"""Per-layer precision overrides: keep chosen layers in 16-bit or float.

An override is ``SELECTOR=PRECISION``. The selector picks nodes of the prepared model:

* ``Conv_12`` — an exact node name (unnamed nodes are named ``<OpType>_<index>``);
* ``*/attention/*`` — a glob over node names;
* ``re:^block[34]/`` — a regular expression searched in node names;
* ``op:Softmax`` — every node of an op type.

PRECISION is an activation dtype (``int8``, ``uint8``, ``int16``, ``uint16``) or ``float``.

Rules, applied to the plan in order (a later override wins):

* a dtype sets the precision of the node's quantized input activations; tensors that share
  parameters (a MaxPool output and its input...) share the dtype, so the whole group changes.
  Weights keep their dtype (16-bit activations with 8-bit weights, A16W8);
* ``float`` leaves the node's input activations, weights and bias unquantized. Other readers
  of those activations read them in float too (one Q/DQ pair per tensor in QDQ models).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from onnx import ModelProto, NodeProto

from edgequant.errors import ConfigError, TensorNameError, closest_names
from edgequant.quant.dtypes import QuantDType

FLOAT = "float"


@dataclass(frozen=True)
class Override:
    """Keep the nodes picked by ``selector`` at ``precision`` (a QuantDType, or ``"float"``)."""

    selector: str
    precision: QuantDType | str

    @classmethod
    def parse(cls, text: str) -> Override:
        selector, sep, precision = text.rpartition("=")
        if not sep or not selector.strip() or not precision.strip():
            raise ConfigError(f"override {text!r} must read SELECTOR=PRECISION, e.g. Conv_12=int16 or op:Softmax=float")
        return cls(selector.strip(), parse_precision(precision.strip()))

    def __str__(self) -> str:
        p = self.precision if isinstance(self.precision, str) else self.precision.value
        return f"{self.selector}={p}"

    def matches(self, node: NodeProto) -> bool:
        s = self.selector
        if s.startswith("op:"):
            return node.op_type == s[3:]
        if s.startswith("re:"):
            return re.search(s[3:], node.name) is not None
        if any(c in s for c in "*?["):
            return fnmatch.fnmatchcase(node.name, s)
        return node.name == s

    def select(self, nodes: Iterable[NodeProto]) -> list[NodeProto]:
        nodes = list(nodes)
        if self.selector.startswith("re:"):
            try:
                re.compile(self.selector[3:])
            except re.error as exc:
                raise ConfigError(f"override {self}: bad regular expression ({exc})") from None
        picked = [n for n in nodes if self.matches(n)]
        if not picked:
            if self.selector.startswith("op:"):
                ops = sorted({n.op_type for n in nodes})
                raise TensorNameError(f"override {self} matches no node: the model has no {self.selector[3:]!r} op; "
                                      f"its ops are {closest_names(self.selector[3:], ops)}")
            raise TensorNameError(f"override {self} matches no node; closest node names: "
                                  f"{closest_names(self.selector.removeprefix('re:'), [n.name for n in nodes])}")
        return picked


def parse_precision(text: str) -> QuantDType | str:
    if text.lower() in ("float", "fp32", "float32", "fp"):
        return FLOAT
    try:
        return QuantDType.parse(text)
    except ConfigError:
        raise ConfigError(f"precision {text!r} is not one of int8, uint8, int16, uint16, float") from None


def apply_overrides(plan, model: ModelProto, overrides: Iterable[Override]) -> None:
    """Change ``plan`` (a QuantPlan) in place as the overrides say; see the module rules."""
    nodes = list(model.graph.node)
    producers = {o: n for n in nodes for o in n.output}
    for ov in overrides:
        for node in ov.select(nodes):
            inputs = [t for t in dict.fromkeys(node.input) if t in plan.activations]
            if ov.precision == FLOAT:
                _keep_float(plan, node, inputs, producers)
            else:
                roots = {plan.activations[t].root for t in inputs}
                for name, act in list(plan.activations.items()):
                    if act.root in roots:
                        plan.activations[name] = dataclasses.replace(act, dtype=ov.precision)
            plan.precision[node.name] = str(ov.precision if isinstance(ov.precision, str) else ov.precision.value)
    _drop_orphan_biases(plan)


def _keep_float(plan, node: NodeProto, inputs: list[str], producers: dict[str, NodeProto]) -> None:
    was_quantized = any(k[0] == node.name for k in plan.weights) or bool(inputs)
    for t in inputs:
        del plan.activations[t]
        relu = producers.get(t)
        if relu is not None and relu.name in plan.folded_nodes:  # the Relu runs again, in float
            del plan.folded_nodes[relu.name]
            _count(plan.quantized_ops, f"{relu.op_type} (folded)", -1)
            plan.float_ops[relu.op_type] += 1
    for key in [k for k in plan.weights if k[0] == node.name]:
        del plan.weights[key]
    for key in [k for k in plan.biases if k[0] == node.name]:
        del plan.biases[key]
    if was_quantized and plan.quantized_ops.get(node.op_type):
        _count(plan.quantized_ops, node.op_type, -1)
        plan.float_ops[node.op_type] += 1


def _count(counter, key: str, delta: int) -> None:
    counter[key] += delta
    if counter[key] <= 0:
        del counter[key]


def _drop_orphan_biases(plan) -> None:
    """A bias becomes int32 with the input's scale; without a quantized input it stays float."""
    for key, bp in list(plan.biases.items()):
        if bp.input_tensor not in plan.activations or (key[0], _weight_slot(plan, key[0])) not in plan.weights:
            del plan.biases[key]


def _weight_slot(plan, node_name: str) -> int:
    return next((slot for (n, slot) in plan.weights if n == node_name), -1)
