"""Small, explicit views over a ``GraphProto``: who produces and consumes each tensor."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from onnx import GraphProto, NodeProto, TensorProto

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def producers(graph: GraphProto) -> dict[str, NodeProto]:
    """Map each tensor name to the node that writes it."""
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: GraphProto) -> dict[str, list[NodeProto]]:
    """Map each tensor name to the nodes that read it (main graph and subgraph captures)."""
    result: dict[str, list[NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                result[name].append(node)
        for name in subgraph_inputs(node):
            result[name].append(node)
    return result


def _direct_bodies(node: NodeProto) -> list[GraphProto]:
    return [a.g for a in node.attribute if a.type == a.GRAPH] + [
        g for a in node.attribute if a.type == a.GRAPHS for g in a.graphs]


def bodies(node: NodeProto) -> Iterator[GraphProto]:
    """Every graph nested in an ``If``/``Loop``/``Scan`` node, at any depth (iteratively)."""
    stack = _direct_bodies(node)
    while stack:
        g = stack.pop()
        yield g
        for n in g.node:
            stack += _direct_bodies(n)


def subgraph_inputs(node: NodeProto) -> set[str]:
    """Names the node's bodies read without defining them (captures from the enclosing scope)."""
    names: set[str] = set()
    for g in bodies(node):
        local = {i.name for i in g.input} | {i.name for i in g.initializer}
        local |= {o for n in g.node for o in n.output}
        names |= {i for n in g.node for i in n.input if i and i not in local}
    return names


def has_subgraph(node: NodeProto) -> bool:
    return any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)


def count_subgraph_nodes(node: NodeProto) -> int:
    return sum(len(g.node) for g in bodies(node))


def initializers(graph: GraphProto) -> dict[str, TensorProto]:
    return {t.name: t for t in graph.initializer}


def elem_types(graph: GraphProto) -> dict[str, int]:
    """Element type of every tensor whose type is known (inputs, outputs, value_info, weights)."""
    types: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    return types


def static_shapes(graph: GraphProto) -> dict[str, list[int | str | None]]:
    """Shape of each tensor with a known rank: ints, symbolic names, or None."""
    shapes: dict[str, list[int | str | None]] = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
            ]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def get_attr(node: NodeProto, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class NameScope:
    """Deterministic fresh names that never collide with names already in the graph."""

    def __init__(self, graph: GraphProto):
        self.taken: set[str] = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        self.taken |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
        self.taken |= {o.name for o in graph.output}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name = f"{base}_{k}"
            k += 1
        self.taken.add(name)
        return name
