"""Shape specialization and control-flow folding: the graph an edge deployment runs.

Exporters keep a model general: ``Shape → Gather → Equal(1)`` asks "is the batch 1?", an
``If`` on it picks a branch, and a sample-rate input picks between two whole models. At the
fixed shapes (and pinned input values) a deployment uses, every such test is a constant, and
no NPU runs an ``If``. ``Specialize``:

1. fixes the graph inputs to the given shapes (the model then accepts only those: it is
   correct only there);
2. replaces the uses of each pinned input by a constant of its value (the input stays in the
   model's interface, unused, so callers that feed it keep working);
3. until nothing changes: infers shapes, folds constants (``Shape`` of a static tensor
   included), and replaces each ``If`` whose condition is now a constant by its taken
   branch, inlined into the enclosing graph. Names the branch defines get a prefix of the
   ``If``'s name (``<If name>/<name>``, made unique), so they stay readable and never collide
   with another scope's; values the branch captures from outside keep their names.

4. in the same rounds, unrolls each ``Loop`` whose trip count is now a constant of at most
   ``MAX_TRIPS`` (and whose copies stay within ``MAX_UNROLLED_OPS`` ops), whose condition input
   is absent or true, and whose body passes its condition through unchanged (or sets it to a
   constant true): the body is inlined once per iteration (``<Loop name>/<i>/<name>``), with
   the iteration number a constant, the loop-carried values chained from one copy to the
   next, and each scan output stacked along a new first axis (``Unsqueeze`` + ``Concat``).
   A loop that may stop early on data, or a large one, stays, and its body is counted as
   control flow left in the summary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, helper, numpy_helper

from edgequant.errors import ConfigError
from edgequant.ir.graph import NameScope, count_subgraph_nodes
from edgequant.ir.model import opset_of
from edgequant.passes.constants import FoldConstants
from edgequant.passes.identity import Aliases, rename_everywhere
from edgequant.passes.shapes import InferShapes

log = logging.getLogger(__name__)

CONTROL_FLOW = ("If", "Loop", "Scan")
#: Folding rounds (each round inlines every If whose condition became constant).
MAX_ROUNDS = 32
#: A Loop is unrolled for at most this many iterations, into at most this many ops.
MAX_TRIPS = 64
MAX_UNROLLED_OPS = 4096


@dataclass
class Specialization:
    """What ``Specialize`` did: the shapes and values it fixed, the Ifs it folded and the ops
    they brought into the main graph, and the control flow left."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    values: dict[str, float | int | str] = field(default_factory=dict)
    folded: int = 0
    inlined_ops: int = 0
    unrolled: int = 0  # Loops unrolled
    unrolled_ops: int = 0  # ops their copies brought into the main graph
    left: int = 0  # control-flow nodes still in the main graph
    left_ops: int = 0  # ops inside their bodies

    def describe(self) -> str:
        fixed = [f"{n}={'x'.join(map(str, s)) or 'scalar'}" for n, s in self.shapes.items()]
        fixed += [f"{n}={v}" for n, v in self.values.items()]
        text = f"specialized at {', '.join(fixed)}: folded {self.folded} If ({self.inlined_ops} ops inlined)"
        if self.unrolled:
            text += f", unrolled {self.unrolled} Loop ({self.unrolled_ops} ops)"
        if self.left:
            text += f"; {self.left} control-flow nodes remain ({self.left_ops} ops in their bodies)"
        return text


def has_control_flow(model: ModelProto) -> bool:
    return any(n.op_type in CONTROL_FLOW for n in model.graph.node)


class Specialize:
    """The pass (see the module doc); ``shapes``: input name → static shape; ``values``:
    input name → the value it is pinned to."""

    name = "specialize"

    def __init__(self, shapes: dict[str, tuple[int, ...]], values: dict[str, np.ndarray]):
        self.shapes, self.values = shapes, values
        self.report = Specialization()

    def __call__(self, model: ModelProto) -> bool:
        graph = model.graph
        inputs = {i.name: i for i in graph.input}
        for name in list(self.shapes) + list(self.values):
            if name not in inputs:
                raise ConfigError(f"cannot specialize {name!r}: not an input of the model "
                                  f"(inputs: {', '.join(inputs) or 'none'})")
        for name, shape in self.shapes.items():
            _fix_shape(inputs[name], shape)
        self.report.shapes = {n: tuple(s) for n, s in self.shapes.items()}
        _pin_values(graph, self.values, inputs)
        self.report.values = {n: np.asarray(v).item() if np.asarray(v).size == 1 else "array"
                              for n, v in self.values.items()}
        for _ in range(MAX_ROUNDS):
            InferShapes()(model)
            FoldConstants()(model)
            folded, ops = _inline_constant_ifs(graph)
            unrolled, copies = _unroll_constant_loops(graph, opset_of(model))
            if not folded and not unrolled:
                break
            self.report.folded += folded
            self.report.inlined_ops += ops
            self.report.unrolled += unrolled
            self.report.unrolled_ops += copies
        InferShapes()(model)
        left = [n for n in graph.node if n.op_type in CONTROL_FLOW]
        self.report.left, self.report.left_ops = len(left), sum(count_subgraph_nodes(n) for n in left)
        return bool(self.shapes or self.values)


def _fix_shape(value: onnx.ValueInfoProto, shape: tuple[int, ...]) -> None:
    dims = value.type.tensor_type.shape.dim
    if value.type.tensor_type.HasField("shape") and len(dims) != len(shape):
        declared = "x".join(str(d.dim_value or d.dim_param or "?") for d in dims)
        raise ConfigError(f"input {value.name!r} has rank {len(dims)} ({declared}); the shape "
                          f"{'x'.join(map(str, shape))} has rank {len(shape)}")
    for d, (k, want) in zip(dims, enumerate(shape)):
        if d.HasField("dim_value") and d.dim_value != want:
            raise ConfigError(f"input {value.name!r} dimension {k} is fixed at {d.dim_value} in the model, "
                              f"not {want}")
    value.type.tensor_type.shape.ClearField("dim")
    for want in shape:
        value.type.tensor_type.shape.dim.add().dim_value = int(want)


def _pin_values(graph: GraphProto, values: dict[str, np.ndarray], inputs) -> None:
    """Every use of a pinned input reads a constant ``<input>/pinned`` instead."""
    scope = NameScope(graph)
    aliases = Aliases()
    for name, value in values.items():
        elem = inputs[name].type.tensor_type.elem_type
        array = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(elem))
        const = scope.fresh(f"{name}/pinned")
        graph.initializer.append(numpy_helper.from_array(array, const))
        aliases.add(name, const)
    if aliases:
        rename_everywhere(graph, aliases)


def _condition(graph: GraphProto, node: NodeProto) -> bool | None:
    for t in graph.initializer:
        if t.name == node.input[0]:
            value = numpy_helper.to_array(t)
            return bool(value.reshape(-1)[0]) if value.size == 1 else None
    return None


def _inline_constant_ifs(graph: GraphProto) -> tuple[int, int]:
    """Replace each ``If`` with a constant condition by its branch; (Ifs folded, ops inlined)."""
    folded = ops = 0
    out: list[NodeProto] = []
    scope = NameScope(graph)
    for node in list(graph.node):
        cond = _condition(graph, node) if node.op_type == "If" else None
        if cond is None:
            out.append(node)
            continue
        branch = next(a.g for a in node.attribute if a.name == ("then_branch" if cond else "else_branch"))
        nodes = _inlined(graph, node, branch, scope)
        out += nodes
        folded += 1
        ops += sum(n.op_type != "If" for n in nodes)  # a nested If's ops count when it is inlined
    if folded:
        graph.ClearField("node")
        graph.node.extend(out)
    return folded, ops


def _inlined(graph: GraphProto, node: NodeProto, branch: GraphProto, scope: NameScope) -> list[NodeProto]:
    """The branch's nodes, renamed into the enclosing scope, writing the If's outputs."""
    prefix = node.name or "If"
    body = GraphProto()
    body.CopyFrom(branch)
    aliases = Aliases()
    results = [o.name for o in body.output]
    produced = {o for n in body.node for o in n.output if o}
    local = produced | {t.name for t in body.initializer}
    finals = dict(zip(results, node.output))
    for name in sorted(local):
        if name in finals and name in produced and list(results).count(name) == 1:
            aliases.add(name, finals[name])  # the producing node writes the If's output directly
        else:
            aliases.add(name, scope.fresh(f"{prefix}/{name}"))
    nodes = _spliced(graph, body, aliases, scope, prefix)
    for inner, outer in zip(results, node.output):
        written = aliases.resolve(inner)
        if written != outer:  # a captured outer value, a branch initializer or a repeated result
            nodes.append(helper.make_node("Identity", [written], [outer], name=scope.fresh(f"{prefix}/{outer}")))
    return nodes



def _spliced(graph: GraphProto, body: GraphProto, aliases: Aliases, scope: NameScope, prefix: str) -> list[NodeProto]:
    """``body``'s nodes renamed through ``aliases`` for ``graph``, which takes its initializers
    and value infos; each node named ``<prefix>/<name>`` (made unique)."""
    rename_everywhere(body, aliases)
    for t in body.initializer:
        t.name = aliases.resolve(t.name)
        graph.initializer.append(t)
    for v in body.value_info:
        if v.name in aliases.to:
            v.name = aliases.resolve(v.name)
            graph.value_info.append(v)
    nodes = list(body.node)
    for n in nodes:
        n.name = scope.fresh(f"{prefix}/{n.name or n.op_type}")
    return nodes


def _constant(graph: GraphProto, name: str) -> np.ndarray | None:
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def _passes_condition(body: GraphProto) -> bool:
    """The body's condition output is its condition input, an Identity of it, or a constant true."""
    cond_in, cond_out = body.input[1].name, body.output[0].name
    if cond_out == cond_in:
        return True
    value = _constant(body, cond_out)
    if value is not None:
        return value.size == 1 and bool(value.reshape(-1)[0])
    prod = next((n for n in body.node if cond_out in n.output), None)
    if prod is not None and prod.op_type == "Identity" and prod.input[0] == cond_in:
        return True
    if prod is not None and prod.op_type == "Constant" and prod.attribute and prod.attribute[0].name == "value":
        value = numpy_helper.to_array(prod.attribute[0].t)
        return value.size == 1 and bool(value.reshape(-1)[0])
    return False


def _trips(graph: GraphProto, node: NodeProto, body: GraphProto) -> int | None:
    """The Loop's iteration count when it is a constant and the loop cannot stop before it."""
    if not node.input or not node.input[0]:
        return None
    count = _constant(graph, node.input[0])
    if count is None or count.size != 1:
        return None
    if len(node.input) > 1 and node.input[1]:
        cond = _constant(graph, node.input[1])
        if cond is None or cond.size != 1 or not bool(cond.reshape(-1)[0]):
            return None
    return int(count.reshape(-1)[0]) if _passes_condition(body) else None


def _unroll_constant_loops(graph: GraphProto, opset: int) -> tuple[int, int]:
    """Unroll each Loop ``_trips`` allows (module doc, step 4); (Loops unrolled, ops added)."""
    unrolled = ops = 0
    out: list[NodeProto] = []
    scope = NameScope(graph)
    for node in list(graph.node):
        body = next((a.g for a in node.attribute if a.name == "body"), None) if node.op_type == "Loop" else None
        trips = _trips(graph, node, body) if body is not None else None
        if body is None or trips is None or not 1 <= trips <= MAX_TRIPS or trips * len(body.node) > MAX_UNROLLED_OPS:
            out.append(node)
            continue
        nodes = _unrolled(graph, node, body, trips, scope, opset)
        out += nodes
        unrolled += 1
        ops += len(nodes)
    if unrolled:
        graph.ClearField("node")
        graph.node.extend(out)
    return unrolled, ops


def _unrolled(graph: GraphProto, node: NodeProto, body: GraphProto, trips: int, scope: NameScope,
              opset: int) -> list[NodeProto]:
    """The body once per iteration, writing the Loop's outputs (ONNX keeps a body's names apart
    from every enclosing scope's, so renaming never confuses the two)."""
    prefix = node.name or "Loop"
    carried_count = len(node.input) - 2
    local = {o for n in body.node for o in n.output if o} | {t.name for t in body.initializer} | {i.name for i in body.input}
    carried = list(node.input[2:])
    scans: list[list[str]] = [[] for _ in range(len(body.output) - 1 - carried_count)]
    nodes: list[NodeProto] = []
    for i in range(trips):
        copy = GraphProto()
        copy.CopyFrom(body)
        aliases = Aliases()
        step = scope.fresh(f"{prefix}/{i}/iteration")
        graph.initializer.append(numpy_helper.from_array(np.array(i, np.int64), step))
        aliases.add(copy.input[0].name, step)
        true = scope.fresh(f"{prefix}/{i}/condition")
        graph.initializer.append(numpy_helper.from_array(np.array(True), true))
        aliases.add(copy.input[1].name, true)
        for value, outer in zip(copy.input[2:], carried):
            aliases.add(value.name, outer)
        for name in sorted(local - {v.name for v in copy.input}):
            aliases.add(name, scope.fresh(f"{prefix}/{i}/{name}"))
        nodes += _spliced(graph, copy, aliases, scope, f"{prefix}/{i}")
        results = [aliases.resolve(o.name) for o in copy.output]
        carried = results[1:1 + carried_count]
        for k, name in enumerate(results[1 + carried_count:]):
            scans[k].append(name)
    for outer, final in zip(node.output[:carried_count], carried):
        if outer:
            nodes.append(helper.make_node("Identity", [final], [outer], name=scope.fresh(f"{prefix}/{outer}")))
    axes = None
    if opset >= 13 and scans:
        axes = scope.fresh(f"{prefix}/axes")
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
    for outer, parts in zip(node.output[carried_count:], scans):
        if not outer:
            continue
        stacked = []
        for part in parts:
            name = scope.fresh(f"{part}/unsqueezed")
            unsqueeze = helper.make_node("Unsqueeze", [part, axes] if axes else [part], [name],
                                         name=scope.fresh(f"{name}/Unsqueeze"))
            if axes is None:  # before opset 13 the axes are an attribute
                unsqueeze.attribute.append(helper.make_attribute("axes", [0]))
            nodes.append(unsqueeze)
            stacked.append(name)
        nodes.append(helper.make_node("Concat", stacked, [outer], name=scope.fresh(f"{prefix}/{outer}/Concat"), axis=0))
    return nodes
