"""Which nodes (or tensors) an override applies to.

* ``NamePattern``: ``Conv_12`` (exact node name), ``*/attn/*`` (glob), ``re:REGEX``, ``op:TYPE``,
  or ``tensor:NAME`` / ``tensor:GLOB`` for activation tensors instead of nodes;
* ``Between``: XQuant's ``custom_setting`` subgraph — every node on a path from one of the
  ``input_names`` edges to one of the ``output_names`` edges (a side branch that joins the path
  from elsewhere is not inside);
* ``After``: everything downstream of tensors (``truncate_var_names``; ``--float-after`` also
  takes the tensor's producer);
* ``Before``: a tensor's producer and everything upstream of it (``--float-before``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Protocol

from onnx import ModelProto, NodeProto

from edgequant.errors import ConfigError, TensorNameError, closest_names
from edgequant.ir.graph import GraphIndex

Graph = ModelProto | GraphIndex  # a selector reads a model, or an index of one built once


class Selector(Protocol):
    def select(self, model: Graph) -> list[NodeProto]: ...


def _check_tensors(index: GraphIndex, names: tuple[str, ...], what: str) -> None:
    known = set(index.tensor_names())
    for name in names:
        if name not in known:
            raise TensorNameError(f"{what}: {name!r} is not a tensor of the model; closest: "
                                  f"{closest_names(name, sorted(known))}")


def _forward(index: GraphIndex, tensors: set[str]) -> set[str]:
    """Names of the nodes that read, directly or not, one of ``tensors`` (node names are unique
    in a planned model)."""
    cons = index.consumers
    seen: set[str] = set()
    stack = list(tensors)
    while stack:
        for node in cons.get(stack.pop(), []):
            if node.name not in seen:
                seen.add(node.name)
                stack += [o for o in node.output if o]
    return seen


def _backward(index: GraphIndex, tensors: set[str]) -> set[str]:
    """Names of the nodes that write, directly or not, one of ``tensors``."""
    prod = index.producers
    seen: set[str] = set()
    stack = list(tensors)
    while stack:
        node = prod.get(stack.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            stack += [i for i in node.input if i]
    return seen


@dataclass(frozen=True)
class NamePattern:
    text: str

    @property
    def tensors(self) -> bool:
        return self.text.startswith("tensor:")

    def _matches(self, name: str, op_type: str = "") -> bool:
        s = self.text.removeprefix("tensor:")
        if s.startswith("op:"):
            return op_type == s[3:]
        if s.startswith("re:"):
            return re.search(s[3:], name) is not None
        if any(c in s for c in "*?["):
            return fnmatch.fnmatchcase(name, s)
        return name == s

    def _validate(self) -> None:
        body = self.text.removeprefix("tensor:")
        if body.startswith("re:"):
            try:
                re.compile(body[3:])
            except re.error as exc:
                raise ConfigError(f"selector {self.text!r}: bad regular expression ({exc})") from None
        if self.tensors and body.startswith("op:"):
            raise ConfigError(f"selector {self.text!r}: op: selects nodes; write op:TYPE without tensor:")

    @property
    def exact(self) -> bool:
        """A plain node name: found by lookup, not by matching every node."""
        s = self.text
        return not s.startswith(("tensor:", "op:", "re:")) and not any(c in s for c in "*?[")

    def select(self, model: Graph) -> list[NodeProto]:
        self._validate()
        index = GraphIndex.of(model)
        nodes = index.nodes
        if self.exact and self.text in index.by_name:
            return [index.by_name[self.text]]
        picked = [] if self.exact else [n for n in nodes if self._matches(n.name, n.op_type)]
        if not picked:
            if self.text.startswith("op:"):
                ops = sorted({n.op_type for n in nodes})
                raise TensorNameError(f"{self} matches no node: the model has no {self.text[3:]!r} op; "
                                      f"its ops are {closest_names(self.text[3:], ops)}")
            raise TensorNameError(f"{self} matches no node; closest node names: "
                                  f"{closest_names(self.text.removeprefix('re:'), [n.name for n in nodes])}")
        return picked

    def select_tensors(self, model: Graph, candidates: list[str]) -> list[str]:
        self._validate()
        picked = [t for t in candidates if self._matches(t)]
        if not picked:
            body = self.text.removeprefix("tensor:").removeprefix("re:")
            raise TensorNameError(f"{self} matches no quantized tensor; closest: {closest_names(body, candidates)}")
        return picked

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ExactTensor:
    """One activation tensor by its exact name (names from parameter files may hold glob characters)."""

    name: str
    tensors = True

    def select(self, model: Graph) -> list[NodeProto]:
        raise ConfigError(f"{self} selects a tensor, not nodes")

    def select_tensors(self, model: Graph, candidates: list[str]) -> list[str]:
        if self.name in candidates:
            return [self.name]
        known = set(GraphIndex.of(model).tensor_names())
        why = "is not quantized here (a weight, a shape, or left float)" if self.name in known else \
            "is not a tensor of the model"
        raise TensorNameError(f"tensor {self.name!r} {why}; closest quantized tensors: "
                              f"{closest_names(self.name, candidates)}")

    def __str__(self) -> str:
        return f"tensor {self.name}"


@dataclass(frozen=True)
class ExactNodes:
    """Nodes by their exact names (names may hold glob characters: ``/_conv_stem/Conv``)."""

    names: tuple[str, ...]

    def select(self, model: Graph) -> list[NodeProto]:
        wanted = set(self.names)
        return [n for n in GraphIndex.of(model).nodes if n.name in wanted]

    def __str__(self) -> str:
        return ", ".join(self.names)


@dataclass(frozen=True)
class Between:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def select(self, model: Graph) -> list[NodeProto]:
        if not self.inputs or not self.outputs:
            raise ConfigError(f"{self}: give both input_names and output_names (the subgraph's boundary edges)")
        index = GraphIndex.of(model)
        _check_tensors(index, self.inputs + self.outputs, "custom_setting")
        inside = _forward(index, set(self.inputs)) & _backward(index, set(self.outputs))
        picked = [n for n in index.nodes if n.name in inside]
        if not picked:
            raise TensorNameError(f"{self} holds no node: no path leads from its inputs to its outputs")
        return picked

    def __str__(self) -> str:
        return f"subgraph {list(self.inputs)} → {list(self.outputs)}"


@dataclass(frozen=True)
class After:
    tensors: tuple[str, ...]
    inclusive: bool = False  # also the producers of the tensors (--float-after)
    what: str = "truncate_var_names"

    def select(self, model: Graph) -> list[NodeProto]:
        index = GraphIndex.of(model)
        _check_tensors(index, self.tensors, self.what)
        graph_inputs, outputs, cons = set(index.inputs), set(index.outputs), index.consumers
        for t in self.tensors:
            if t in graph_inputs and not self.inclusive:
                raise ConfigError(f"{self.what}: {t!r} is a model input, so everything would stay float; name a "
                                  "tensor inside the graph where post-processing begins")
            if not cons.get(t) and not self.inclusive:
                why = "a model output" if t in outputs else "read by no node"
                raise ConfigError(f"{self.what}: {t!r} is {why}, so nothing comes after it; name the tensor "
                                  "where post-processing begins")
        region = _forward(index, set(self.tensors))
        if self.inclusive:
            region |= {index.producers[t].name for t in self.tensors if t in index.producers}
        picked = [n for n in index.nodes if n.name in region]
        if len(picked) == len(index.nodes) and not self.inclusive:
            raise ConfigError(f"{self.what}: every node of the model is downstream of {list(self.tensors)}, so "
                              "nothing would be quantized; name tensors further down")
        return picked

    def __str__(self) -> str:
        return f"{'from' if self.inclusive else 'after'} {', '.join(self.tensors)}"


@dataclass(frozen=True)
class Before:
    tensor: str

    def select(self, model: Graph) -> list[NodeProto]:
        index = GraphIndex.of(model)
        _check_tensors(index, (self.tensor,), "--float-before")
        region = _backward(index, {self.tensor})
        if not region:
            raise ConfigError(f"--float-before: {self.tensor!r} is a model input; nothing comes before it")
        return [n for n in index.nodes if n.name in region]

    def __str__(self) -> str:
        return f"up to {self.tensor}"


@dataclass(frozen=True)
class Statistics:
    """The statistics path of every decomposed normalisation (``overrides.statistics_path``)."""

    def select(self, model: Graph) -> list[NodeProto]:
        from edgequant.planning.overrides import statistics_path

        index = GraphIndex.of(model)
        wanted = statistics_path(index.nodes)
        return [n for n in index.nodes if n.name in wanted]

    def __str__(self) -> str:
        return "normalisation statistics"
