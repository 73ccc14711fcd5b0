"""Small, explicit views over a ``GraphProto``: who produces and consumes each tensor."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper

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


def direct_bodies(node: NodeProto) -> list[GraphProto]:
    return [a.g for a in node.attribute if a.type == a.GRAPH] + [
        g for a in node.attribute if a.type == a.GRAPHS for g in a.graphs]


def bodies(node: NodeProto) -> Iterator[GraphProto]:
    """Every graph nested in an ``If``/``Loop``/``Scan`` node, at any depth (iteratively)."""
    stack = direct_bodies(node)
    while stack:
        g = stack.pop()
        yield g
        for n in g.node:
            stack += direct_bodies(n)


def subgraph_inputs(node: NodeProto) -> set[str]:
    """Names the node's bodies read without defining them (captures from the enclosing scope).

    A nested body may read what an enclosing body defines: that is local to the node, not a
    capture."""
    names: set[str] = set()
    stack: list[tuple[GraphProto, set[str]]] = [(g, set()) for g in direct_bodies(node)]
    while stack:
        g, enclosing = stack.pop()
        local = enclosing | {i.name for i in g.input} | {i.name for i in g.initializer}
        local |= {o for n in g.node for o in n.output}
        names |= {i for n in g.node for i in n.input if i and i not in local}
        stack += [(b, local) for n in g.node for b in direct_bodies(n)]
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


class GraphIndex:
    """One walk of a graph, read many times: its nodes by name and position, who produces and
    who consumes each tensor (subgraph captures included), and its value names."""

    def __init__(self, graph: GraphProto):
        self.graph = graph
        self.nodes: list[NodeProto] = list(graph.node)
        self.by_name: dict[str, NodeProto] = {n.name: n for n in self.nodes}
        self.producers = producers(graph)
        self.consumers = consumers(graph)
        self.inputs = [i.name for i in graph.input]
        self.outputs = [o.name for o in graph.output]
        self.source: GraphProto | None = None  # the user's graph before the passes, when known

    @classmethod
    def of(cls, model: ModelProto | GraphIndex) -> GraphIndex:
        return model if isinstance(model, GraphIndex) else cls(model.graph)

    def tensor_names(self) -> list[str]:
        """Graph inputs and node outputs, in graph order."""
        return list(dict.fromkeys(self.inputs + [o for n in self.nodes for o in n.output if o]))


def outline(graph: GraphProto) -> GraphProto:
    """A copy of ``graph``'s structure: nodes (attributes included), inputs, outputs, and the
    initializers' names, types and shapes without their data (a ``Constant`` node becomes
    such an initializer). Small, whatever the weights."""
    light = GraphProto(name=graph.name)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.input:
            light.initializer.add(name=node.output[0])
        else:
            light.node.append(node)
    light.input.extend(graph.input)
    light.output.extend(graph.output)
    for t in graph.initializer:
        light.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    return light


def remove_nodes(graph, positions: set[int]) -> None:
    """Drop the nodes at ``positions``, keeping the order of the rest (one pass)."""
    if not positions:
        return
    keep = [n for k, n in enumerate(graph.node) if k not in positions]
    graph.ClearField("node")
    graph.node.extend(keep)


def get_attr(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def graph_names(graph: GraphProto) -> set[str]:
    """Every value and node name defined in ``graph`` and, at any depth, in its subgraphs."""
    names: set[str] = set()
    stack = [graph]
    while stack:
        g = stack.pop()
        names |= {i.name for i in g.input} | {t.name for t in g.initializer} | {o.name for o in g.output}
        for n in g.node:
            names.update(o for o in n.output if o)
            names.add(n.name)
            stack += direct_bodies(n)
    names.discard("")
    return names


class NameScope:
    """Deterministic fresh names that never collide with a name already in the graph or in any
    of its ``If``/``Loop``/``Scan`` bodies (ONNX wants names unique across the whole model:
    a body may not redefine a name of an enclosing scope)."""

    def __init__(self, graph: GraphProto):
        self.taken: set[str] = graph_names(graph)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name = f"{base}_{k}"
            k += 1
        self.taken.add(name)
        return name
