"""A large model run as a chain of sessions over consecutive stretches of its nodes.

onnxruntime's session creation grows much faster than the graph: a 24,000-node QDQ chain
takes 30 s where four stretches of it take 6 s and eight take 2.5 s. So a model with more
than ``SEGMENT_NODES`` nodes is cut, in graph (topological) order, into stretches of about
that many nodes, each its own session; a run feeds each stretch the tensors earlier ones
produced. Cuts fall where the fewest tensors cross (block boundaries), and a
DequantizeLinear whose output crosses a cut is repeated in the stretch that reads it, so
that onnxruntime still fuses ``DQ → op → Q`` into integer kernels: a QDQ model gives the
numbers of one session, bit for bit. A float model may lose a fusion that spans a cut
(MatMul + Add into Gemm...), which moves the last bits of a value. Cut positions depend on
the graph alone, so runs are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper

from edgequant.ir.graph import subgraph_inputs
from edgequant.ir.model import skeleton

#: Above this many nodes a model runs as a chain of sessions of about this many nodes.
SEGMENT_NODES = 1500
#: How far (in nodes) a cut may move from its target to find fewer crossing tensors.
CUT_WINDOW = 400


@dataclass(frozen=True)
class Port:
    """What ``get_inputs``/``get_outputs`` give: a tensor name."""

    name: str


@dataclass
class _Stretch:
    session: object
    inputs: list[str]
    outputs: list[str]


class SegmentedSession:
    """The session interface edgequant uses (``run``, ``run_with_ort_values``,
    ``get_inputs``, ``get_outputs``) over a chain of sessions."""

    def __init__(self, stretches: list[_Stretch], inputs: list[str], outputs: list[str],
                 last_use: dict[str, int]):
        self.stretches, self._inputs, self._outputs = stretches, inputs, outputs
        self._last_use = last_use  # tensor → index of the last stretch that reads it

    def get_inputs(self) -> list[Port]:
        return [Port(n) for n in self._inputs]

    def get_outputs(self) -> list[Port]:
        return [Port(n) for n in self._outputs]

    def _chain(self, names: Sequence[str] | None, feed: dict, run: Callable) -> list:
        wanted = list(names) if names is not None else list(self._outputs)
        keep = set(wanted)
        values = dict(feed)
        for k, s in enumerate(self.stretches):
            got = run(s.session, s.outputs, {n: values[n] for n in s.inputs})
            values.update(zip(s.outputs, got))
            for n in [n for n in values if n not in keep and self._last_use.get(n, -1) <= k]:
                del values[n]  # read by no later stretch: free it
        return [values[n] for n in wanted]

    def run(self, names: Sequence[str] | None, feed: dict) -> list[np.ndarray]:
        return self._chain(names, feed, lambda sess, outs, f: sess.run(outs, f))

    def run_with_ort_values(self, names: Sequence[str] | None, feed: dict) -> list:
        return self._chain(names, feed, lambda sess, outs, f: sess.run_with_ort_values(outs, f))


def _reads(node: NodeProto) -> list[str]:
    """The tensors a node reads: its inputs, and what its bodies capture."""
    names = [i for i in node.input if i]
    if any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
        names += sorted(subgraph_inputs(node))
    return names


def _cuts(nodes: list[NodeProto], reads: list[list[str]], fixed: set[str], size: int) -> list[int]:
    """Positions (node indices where a stretch starts) about ``size`` apart, each where the
    fewest tensors cross within ``CUT_WINDOW`` of its target."""
    n = len(nodes)
    made = {}
    diff = np.zeros(n + 2, np.int64)
    for k, node in enumerate(nodes):
        for o in node.output:
            if o:
                made[o] = k
    last: dict[str, int] = {}
    for k, names in enumerate(reads):
        for t in names:
            if t in made and t not in fixed:
                last[t] = k
    for t, k in last.items():
        if made[t] < k:
            diff[made[t] + 1] += 1
            diff[k + 1] -= 1
    crossing = np.cumsum(diff)[: n + 1]
    cuts: list[int] = []
    target = size
    while target < n - size // 2:
        lo, hi = max(cuts[-1] + size // 2 if cuts else 1, target - CUT_WINDOW), min(n - 1, target + CUT_WINDOW)
        window = crossing[lo : hi + 1]
        best = lo + int(np.argmin(window + np.abs(np.arange(lo, hi + 1) - target) * 1e-6))
        cuts.append(best)
        target = best + size
    return cuts


def split_model(model: ModelProto, nodes: list[NodeProto], outputs: list[str],
                build: Callable[[ModelProto], object], size: int = SEGMENT_NODES) -> SegmentedSession | None:
    """``model``'s ``nodes`` (its nodes in a topological order) with ``outputs`` wanted, as a
    chain of sessions made by ``build``; None when it cannot be cut safely (a boundary tensor
    of unknown type)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in inits]
    types = _elem_types(model)
    reads_of = {id(node): _reads(node) for node in nodes}
    cuts = _cuts(nodes, [reads_of[id(node)] for node in nodes], set(inits), size)
    bounds = list(zip([0, *cuts], [*cuts, len(nodes)]))
    produced_in = {o: s for s, (a, b) in enumerate(bounds) for node in nodes[a:b] for o in node.output if o}
    dq = {node.output[0]: node for node in nodes if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx")}
    wanted = set(outputs)
    pieces = []
    for s, (a, b) in enumerate(bounds):
        chunk = nodes[a:b]
        made = {o for node in chunk for o in node.output if o}
        front: list[NodeProto] = []  # (ids: the repeated DQs are the same objects as in ``nodes``)
        for t in dict.fromkeys(t for node in chunk for t in reads_of[id(node)]):
            if t not in made and t in dq and produced_in.get(t, s) < s:
                front.append(dq[t])  # repeat the DequantizeLinear here: DQ → op stays fusable
                made.add(t)
        body = front + chunk
        reads = list(dict.fromkeys(t for node in body for t in reads_of[id(node)] if t not in made))
        pieces.append((body, reads, made))
    last_use: dict[str, int] = {}
    for s, (_, reads, _) in enumerate(pieces):
        for t in reads:
            last_use[t] = s
    stretches = []
    for s, (body, reads, made) in enumerate(pieces):
        ins = [t for t in reads if t not in inits]
        outs = list(dict.fromkeys(t for node in body for t in node.output  # graph order, once
                                  if t in made and (t in wanted or last_use.get(t, -1) > s)))
        if any(t not in types for t in ins + outs):
            return None
        sub = helper.make_graph(
            body, f"{graph.name}_part{s}",
            [helper.make_tensor_value_info(t, types[t], None) for t in ins],
            [helper.make_tensor_value_info(t, types[t], None) for t in outs],
            initializer=[inits[t] for t in reads if t in inits])
        part = helper.make_model(sub, opset_imports=list(model.opset_import))
        part.ir_version = model.ir_version
        stretches.append(_Stretch(build(part), ins, outs))
    for t in outputs:
        last_use.setdefault(t, len(stretches))
    return SegmentedSession(stretches, graph_inputs, outputs, last_use)


def _elem_types(model: ModelProto) -> dict[str, int]:
    """Element type of every tensor, from type inference over the model (weights left out)."""
    light = skeleton(model)
    light.graph.ClearField("value_info")
    try:
        light = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:  # best effort: unknown types stop the split, never the run
        pass
    types: dict[str, int] = {}
    for vi in list(light.graph.input) + list(light.graph.output) + list(light.graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return types
