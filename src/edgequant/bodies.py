"""Quantization inside the ``If``, ``Loop`` and ``Scan`` bodies that stay: those whose
condition or trip count depends on data (a Scan's iterations follow its input's length).

Specialization folds the ``If``s a deployment's fixed shapes decide and unrolls the
``Loop``s whose trip count folds (``passes.specialize``). What is left holds its compute in
bodies, where the main graph's plan does not reach. Each body that holds something to
quantize becomes a model of its own:

* its inputs are a ``Loop`` body's formal inputs (iteration number, condition, carried
  values), a ``Scan`` body's (states and input slices), and the names it captures from the
  main graph; the main graph's weights it reads are its initializers;
* it is calibrated on the values those inputs take: for an ``If`` branch, on the calibration
  samples that take the branch (the condition observed alongside); for a ``Loop`` or
  ``Scan`` body, on its iterations over the calibration samples (exposed for that run as
  extra scan outputs), at most as many as there are calibration samples, evenly spaced;
* it is quantized as ``quantize`` quantizes a model, with the run's options: checked on its
  own held-out samples, repaired where its guard fires, the control flow inside it
  recursively;
* its QDQ graph goes back in place of the body in every model the state assembles. The
  names it adds are prefixed with the node's name and the branch (``If_0/then/…``,
  ``recur/body/…``), so they stay unique; a weight quantized inside it leaves the main
  graph when nothing else reads it.

A branch no calibration sample takes stays float, and the summary says so, as it does for a
body that cannot be quantized (the model is written all the same). Recovery algorithms,
overrides and the mixed-precision search act on the main graph; the parameter files
describe the main graph's tensors (``export.export_params``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from edgequant.data.sources import CalibrationSource, Sample
from edgequant.ir.graph import bodies, direct_bodies, subgraph_inputs
from edgequant.ir.model import opset_of
from edgequant.planning.options import QuantOptions, Recovery
from edgequant.planning.plan import build_plan
from edgequant.result import QuantizeResult
from edgequant.runtime.feed import run_in_place
from edgequant.runtime.session import make_session

log = logging.getLogger("edgequant")
Progress = Callable[[str, int, int], None]
BRANCHES = ("then_branch", "else_branch")


class Feeds(CalibrationSource):
    """Samples held as feed dicts, yielded as they are (values captured from a model's run)."""

    def __init__(self, feeds: list[Sample], specs):
        self.feeds, self.specs = feeds, specs

    def __len__(self) -> int:
        return len(self.feeds)

    def _from(self, start: int):
        return start, iter(self.feeds[start:])


@dataclass
class Branch:
    """One quantized branch: the ``If`` node, which branch, and the branch quantized as a model
    of its own (``result``: repaired by the default repair where its guard fired)."""

    node: str
    attr: str
    result: QuantizeResult
    original: GraphProto  # the branch as it was (its names, for the splice)
    weights: dict[str, TensorProto]  # the main graph's weights it reads, as they are there
    samples: int
    kind: str = "If"  # the node's op type
    _graph: GraphProto | None = field(default=None, repr=False)

    @property
    def prefix(self) -> str:
        return f"{self.node}/{self.attr.removesuffix('_branch')}/"

    def graph(self) -> GraphProto:
        """The branch's QDQ graph, ready to stand in the ``If`` (made once)."""
        if self._graph is None:
            self._graph = _as_branch(self.result.model, self.original, self.weights, self.prefix)
        return self._graph

    def counts(self) -> tuple[dict[str, int], int]:
        """(quantized ops by type, ops left float) inside this branch, nested branches included."""
        s = self.result.summary
        return dict(s.quantized_ops), sum(s.float_ops.values()) + s.subgraph_float_ops


def nodes_in(graph: GraphProto) -> int:
    """The ops of ``graph`` and of every graph nested in it."""
    return len(graph.node) + sum(len(g.node) for n in graph.node for g in bodies(n))


def state_counts(plan, found: Bodies) -> tuple[dict[str, int], int]:
    """(quantized ops by type, ops left float inside bodies) of ``plan`` with the quantized
    branches ``found`` counted in: what the summary reports."""
    quantized, float_inside = dict(plan.quantized_ops), plan.subgraph_float_ops
    for b in found.branches:
        q, f = b.counts()
        for k, v in q.items():
            quantized[k] = quantized.get(k, 0) + v
        float_inside += f - nodes_in(b.original)
    return quantized, float_inside


@dataclass(frozen=True)
class Bodies:
    """What ``quantize_bodies`` did: the quantized branches, and the notes for the summary."""

    branches: tuple[Branch, ...] = ()
    notes: tuple[str, ...] = ()


def body_lines(found: Bodies) -> list[str]:
    """The summary's notes on the quantized branches: per branch, its samples, the ops
    quantized inside, and what its repair kept."""
    lines = []
    for b in found.branches:
        s = b.result.summary
        ops = f"({sum(s.quantized_ops.values())} ops quantized, {sum(s.float_ops.values())} float)"
        line = (f"{b.kind} {b.node}: body quantized on {b.samples} of its iterations on the calibration samples {ops}"
                if b.attr == "body" else
                f"If {b.node}: {b.attr.removesuffix('_branch')} branch quantized on the {b.samples} calibration "
                f"samples that take it {ops}")
        if s.repair:
            line += f"; its guard fired and the repair {s.repair[-1].replace('kept: ', 'kept ')}"
        lines.append(line)
        lines += [f"{b.prefix.rstrip('/')}: {n}" for n in s.notes if n.startswith(("If ", "Loop ", "Scan "))]
    return lines


def body_macs(found: Bodies) -> tuple[int, int]:
    """(MACs with both operands 8-bit, all MACs) of the compute ops inside the branches."""
    pairs = [b.result.summary.eight_bit_macs or (0, 0) for b in found.branches]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


#: Ops whose branch is worth a note when no sample takes it (it holds the model's compute).
COMPUTE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Einsum"})


def _computes(graph: GraphProto) -> bool:
    return any(n.op_type in COMPUTE for g in [graph, *(b for n in graph.node for b in bodies(n))] for n in g.node)


def _wanted(node: NodeProto) -> bool:
    return node.op_type in ("If", "Loop", "Scan") and node.domain in ("", "ai.onnx") and \
        any(len(g.node) for g in direct_bodies(node))


def _graph(node: NodeProto, attr: str) -> GraphProto:
    return next(a.g for a in node.attribute if a.name == attr)


def _branch_model(model: ModelProto, node: NodeProto, attr: str, feeds: list[dict[str, np.ndarray]]) -> ModelProto:
    """The branch ``attr`` of ``node`` as a model: its formal and captured names as inputs
    (typed from ``feeds``: a dimension that differs between them is symbolic), the main
    graph's weights it reads as initializers."""
    branch = _graph(node, attr)
    inits = {t.name: t for t in model.graph.initializer}
    captured = _captures(branch)
    g = helper.make_graph(list(branch.node), branch.name or attr, [], list(branch.output),
                          initializer=list(branch.initializer) + [inits[n] for n in captured if n in inits],
                          value_info=list(branch.value_info))
    for name in [i.name for i in branch.input] + [n for n in captured if n not in inits]:
        if name not in inits:
            v = feeds[0][name]
            dims = [d if all(f[name].shape[k] == d for f in feeds) else f"{name}_{k}"
                    for k, d in enumerate(v.shape)] if all(f[name].ndim == v.ndim for f in feeds) else None
            g.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), dims))
    out = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return out


def _captures(graph: GraphProto) -> list[str]:
    """The names ``graph`` (a body) reads from the enclosing scope, sorted."""
    probe = helper.make_node("If", ["c"], [], then_branch=graph, else_branch=GraphProto(name="empty"))
    return sorted(subgraph_inputs(probe))


def _loop_feeds(model: ModelProto, loop: NodeProto, samples, device: str, limit: int) -> list[dict[str, np.ndarray]]:
    """The inputs a ``Loop``'s or ``Scan``'s body gets, iteration by iteration, on ``samples``:
    a Loop's iteration number, condition and carried values, a Scan's states and input slices
    (exposed as extra scan outputs, stacked on axis 0, for this run only), and the names it
    captures. At most ``limit`` iterations, evenly spaced over all of them."""
    body = _graph(loop, "body")
    saved_body, saved_outputs = GraphProto(), list(loop.output)
    saved_body.CopyFrom(body)
    saved_attrs = [type(a)() for a in loop.attribute]
    for kept, a in zip(saved_attrs, loop.attribute):
        kept.CopyFrom(a)
    formal = [i.name for i in body.input]
    seen = [f"{loop.name}::seen::{k}" for k in range(len(formal))]
    for name, out, vi in zip(formal, seen, body.input):
        body.node.append(helper.make_node("Identity", [name], [out], name=out))
        body.output.append(helper.make_tensor_value_info(out, vi.type.tensor_type.elem_type, None))
    loop.output.extend(seen)
    for a in loop.attribute:  # a Scan's per-output axes and directions cover the new outputs too
        if a.name in ("scan_output_axes", "scan_output_directions"):
            a.ints.extend([0] * len(seen))
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    captured = [n for n in _captures(saved_body) if n not in inits]
    exposed = seen + [n for n in captured if n not in graph_inputs]
    feeds: list[dict[str, np.ndarray]] = []
    try:
        sess = make_session(model, exposed, device=device)
        for i, feed in enumerate(samples):
            values = dict(zip(exposed, run_in_place(sess, exposed, feed, i)))
            outer = {n: np.array(feed[n] if n in graph_inputs else values[n]) for n in captured}
            steps = values[seen[0]].shape[0] if seen else 0
            feeds += [{**{f: np.array(values[s][t]) for f, s in zip(formal, seen)}, **outer} for t in range(steps)]
    finally:
        body.CopyFrom(saved_body)
        del loop.output[:]
        loop.output.extend(saved_outputs)
        del loop.attribute[:]
        loop.attribute.extend(saved_attrs)
    if len(feeds) > limit:
        feeds = [feeds[int(k)] for k in np.linspace(0, len(feeds) - 1, limit)]
    return feeds


def _options(options: QuantOptions) -> QuantOptions:
    """The branch's options: the run's, less what acts on the main graph (overrides, recovery,
    specialization); every sample that takes the branch is used."""
    return dataclasses.replace(options, overrides=(), recovery=Recovery(), input_shapes=(), fixed_inputs=(),
                               specialize=False, num_samples=None)


def quantize_bodies(state, progress: Progress | None = None) -> Bodies:
    """Calibrate and quantize every branch of the state's top-level ``If``s, and every body of
    its top-level ``Loop``s, that holds something to quantize (see the module doc); the main
    graph is not changed."""
    model, opts = state.model, state.options
    nodes = [n for n in model.graph.node if _wanted(n)]
    if not nodes or not opts.quantize_bodies:
        return Bodies()
    weights = {t.name: t for t in model.graph.initializer}
    count = state.split.calibration
    ifs = [n for n in nodes if n.op_type == "If"]
    captured = _if_captures(model, ifs, state.samples(0, count), opts.device) if ifs else []
    branches: list[Branch] = []
    notes: list[str] = []

    def attempt(where: str, node: NodeProto, attr: str, feeds: Callable[[], list[dict[str, np.ndarray]]]) -> None:
        try:
            given = feeds()
            found = _branch(model, opts, node, attr, given, weights, progress) if given else \
                "no calibration sample runs an iteration"
        except Exception as exc:  # a body that cannot be quantized stays float; the model still is
            log.warning("%s stays float: %s", where, exc)
            found = f"{type(exc).__name__}: {str(exc)[:200]}"
        if isinstance(found, Branch):
            branches.append(found)
        elif found:
            notes.append(f"{where} stays float ({found})")

    for node in nodes:
        if node.op_type in ("Loop", "Scan"):
            attempt(f"{node.op_type} {node.name}: its body", node, "body",
                    partial(_loop_feeds, model, node, state.samples(0, count), opts.device, max(count, 1)))
            continue
        cond = node.input[0]
        if cond in weights:  # a constant condition the passes left (simplify off)
            taken = [bool(numpy_helper.to_array(weights[cond]).reshape(-1)[0])] * len(captured)
        else:
            taken = [bool(np.asarray(c[cond]).reshape(-1)[0]) for c in captured]
        for attr in BRANCHES:
            branch = _graph(node, attr)
            chosen = [c for c, t in zip(captured, taken) if t == (attr == "then_branch")]
            where = f"If {node.name}: its {attr.removesuffix('_branch')} branch"
            if not chosen and _computes(branch):
                notes.append(f"{where} ({nodes_in(branch)} ops) is taken by no calibration sample and stays float")
            if branch.node and chosen:
                attempt(where, node, attr, partial(list, chosen))
    return Bodies(tuple(branches), tuple(notes))


def _if_captures(model: ModelProto, ifs: list[NodeProto], samples, device: str) -> list[dict[str, np.ndarray]]:
    """Per sample, the conditions of ``ifs`` and every name their branches read from the main
    graph (its weights aside)."""
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    wanted = sorted({n.input[0] for n in ifs} - inits | ({c for n in ifs for c in subgraph_inputs(n)} - inits))
    exposed = [n for n in wanted if n not in graph_inputs]
    sess = make_session(model, exposed, device=device)
    captured = []
    for i, feed in enumerate(samples):
        values = dict(zip(exposed, run_in_place(sess, exposed, feed, i)))
        captured.append({n: np.array(feed[n] if n in graph_inputs else values[n]) for n in wanted})
    return captured


def _branch(model: ModelProto, opts: QuantOptions, node: NodeProto, attr: str, feeds: list[dict[str, np.ndarray]],
            weights: dict[str, TensorProto], progress: Progress | None) -> Branch | str:
    """The branch quantized on ``feeds``; else why not (empty: nothing in it to quantize)."""
    from edgequant.data.inputs import model_inputs
    from edgequant.pipeline import prepare

    branch = _graph(node, attr)
    sub = _branch_model(model, node, attr, feeds)
    read = {t.name for t in sub.graph.initializer} - {t.name for t in branch.initializer}
    interface = ModelProto()  # the branch's inputs and outputs (the passes edit ``sub`` in place)
    interface.graph.input.extend(sub.graph.input)
    interface.graph.output.extend(sub.graph.output)
    names = [i.name for i in sub.graph.input]
    feeds = [{n: f[n] for n in names} for f in feeds]
    prepared = prepare(sub, _options(opts), min_opset=opset_of(model))
    if not _same_interface(prepared.model, interface, model):
        return "the graph passes changed its inputs or outputs"
    if not _plans_something(prepared):
        return ""
    result = _quantized(prepared, Feeds(feeds, model_inputs(prepared.model)), progress)
    if opset_of(result.model) != opset_of(model):
        return f"its repair needs opset {opset_of(result.model)}, the model is at {opset_of(model)}"
    if result.summary.collapse is not None:
        return f"quantized, it is broken: {result.summary.collapse.reason}"
    original = GraphProto()
    original.CopyFrom(branch)
    return Branch(node.name, attr, result, original, {n: weights[n] for n in read}, len(feeds), node.op_type)


def _quantized(prepared, feeds: Feeds, progress: Progress | None) -> QuantizeResult:
    """The branch quantized as ``quantize`` does a model: checked on its held-out samples, and
    repaired where its guard fires (``mixed.repair``), recalibrating on the same feeds."""
    from edgequant.pipeline import calibrate, finish_repaired, prepare

    kept = ModelProto()
    kept.CopyFrom(prepared.model)

    def recalibrate(opts: QuantOptions, min_opset: int):
        model = ModelProto()
        model.CopyFrom(kept)
        return calibrate(prepare(model, opts, min_opset), feeds, progress)
    return finish_repaired(calibrate(prepared, feeds, progress), recalibrate, progress)


def _same_interface(prepared: ModelProto, sub: ModelProto, main: ModelProto) -> bool:
    """Do the prepared branch's outputs and inputs still match the branch (the passes may not
    rename them), at the main model's opset?"""
    return ([o.name for o in prepared.graph.output] == [o.name for o in sub.graph.output]
            and {i.name for i in prepared.graph.input} <= {i.name for i in sub.graph.input}
            and opset_of(prepared) == opset_of(main))


def _plans_something(prepared) -> bool:
    plan = build_plan(prepared.model, prepared.options, prepared.source)
    return bool(plan.activations or plan.weights) or any(_wanted(n) for n in prepared.model.graph.node)


def _defined(graph: GraphProto) -> set[str]:
    """Every name a graph (and the graphs nested in it) defines: node outputs, initializers,
    inputs; and every node name."""
    names: set[str] = set()
    for g in [graph, *(b for n in graph.node for b in bodies(n))]:
        names |= {o for n in g.node for o in n.output if o} | {t.name for t in g.initializer}
        names |= {i.name for i in g.input} | {n.name for n in g.node if n.name}
    return names


def _as_branch(qmodel: ModelProto, original: GraphProto, weights: dict[str, TensorProto],
               prefix: str) -> GraphProto:
    """``qmodel``'s graph as the branch it was made from: no inputs (the captures read the
    enclosing scope again), the main graph's ``weights`` it left as they were dropped (read from
    the enclosing scope too), and the names it added prefixed: they must be unique in the
    whole model."""
    g = GraphProto()
    g.CopyFrom(qmodel.graph)
    captured = {i.name for i in g.input}
    g.ClearField("input")
    g.input.extend(original.input)  # a Loop body's iteration number, condition and carried values
    for vi in [v for v in g.value_info if v.name in captured]:
        g.value_info.remove(vi)
    kept = [t for t in g.initializer if t.name in weights and t.SerializeToString() == weights[t.name].SerializeToString()]
    for t in kept:
        g.initializer.remove(t)
    rename = {n: prefix + n for n in _defined(g) - _defined(original) - captured}
    for sub in [g, *(b for n in g.node for b in bodies(n))]:
        _rename(sub, rename)
    g.name = original.name
    return g


def _rename(g: GraphProto, rename: dict[str, str]) -> None:
    for n in g.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
        if n.name in rename:
            n.name = rename[n.name]
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
    for vi in list(g.value_info) + list(g.input):
        vi.name = rename.get(vi.name, vi.name)


def splice(qmodel: ModelProto, found: Bodies) -> ModelProto:
    """Put each quantized branch in its ``If`` of ``qmodel`` (in place), and drop the main
    graph's weights that only the branches read as floats before. Returns ``qmodel``."""
    if not found.branches:
        return qmodel
    nodes = {n.name: n for n in qmodel.graph.node}
    for b in found.branches:
        node = nodes.get(b.node)
        if node is None:
            continue
        for a in node.attribute:
            if a.name == b.attr:
                a.g.CopyFrom(b.graph())
    read = {i for n in qmodel.graph.node for i in n.input} | {c for n in qmodel.graph.node for c in subgraph_inputs(n)}
    read |= {o.name for o in qmodel.graph.output}
    unused = [t for t in qmodel.graph.initializer if t.name not in read]
    for t in unused:
        qmodel.graph.initializer.remove(t)
    return qmodel


__all__ = ["Bodies", "Branch", "Feeds", "body_lines", "body_macs", "quantize_bodies", "splice", "state_counts"]
