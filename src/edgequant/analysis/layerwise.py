"""Layerwise (isolated) error: quantize one layer at a time, everything else float.

A *layer* is a float node with at least one quantized input (activation, weight or bias) in
the QDQ model. The float model runs once per sample and every intermediate tensor is cached
(under a memory budget). For each layer a *suffix model* is built: the layer, with the QDQ
model's own Quantize/DequantizeLinear nodes on its quantized inputs, plus every node
downstream of it; everything it reads from upstream comes from the float cache. So each
layer costs one run of its suffix per sample, never a run of the whole model or a
recalibration. Recorded per layer: the error of its own output (local) and of the model
output it damages most (output), both against float.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from edgequant.analysis.metrics import FidelityAccumulator, Metrics, sqnr_db
from edgequant.analysis.qdq_map import EdgeQuant, QuantMap, dequantized_weight
from edgequant.data.sources import Sample
from edgequant.ir.graph import NameScope, consumers, initializers, subgraph_inputs
from edgequant.runtime.executor import Executor, InProcess
from edgequant.runtime.feed import run_checked
from edgequant.runtime.session import make_session

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LayerError:
    """What quantizing only this node does: to its own output and to the model output."""

    node: str
    op_type: str
    depth: int
    inputs: tuple[str, ...]
    weights: tuple[str, ...]
    local: Metrics
    output: Metrics
    output_name: str
    weight_sqnr_db: float | None
    seconds: float = 0.0  # time this layer's isolated evaluation took


def float_cache(model: ModelProto, samples: Iterable[Sample], budget_bytes: int,
                device: str = "cpu", outputs_only: bool = False) -> list[dict[str, np.ndarray]]:
    """Every top-level tensor of the float model (or only its outputs) for each sample, with
    the sample's inputs, until the budget is spent."""
    names = ([o.name for o in model.graph.output] if outputs_only else
             list(dict.fromkeys(o for n in model.graph.node for o in n.output if o)))
    sess = make_session(model, names, device=device)
    cache: list[dict[str, np.ndarray]] = []
    used = 0
    for i, feed in enumerate(samples):
        values = {**feed, **{k: np.asarray(v) for k, v in zip(names, run_checked(sess, names, feed, i))
                            if isinstance(v, np.ndarray)}}
        used += sum(v.nbytes for v in values.values())
        cache.append(values)
        if used * (len(cache) + 1) / len(cache) > budget_bytes:
            break
    return cache


def _downstream(model: ModelProto, start: NodeProto, cons: dict[str, list[NodeProto]]) -> list[NodeProto]:
    """``start`` and every node that reads, directly or not, one of its outputs (graph order)."""
    seen = {start.name}  # node names are unique in a planned model
    stack = [o for o in start.output if o]
    while stack:
        for node in cons.get(stack.pop(), []):
            if node.name not in seen:
                seen.add(node.name)
                stack += [o for o in node.output if o]
    return [n for n in model.graph.node if n.name in seen]


class _SuffixBuilder:
    """Builds the suffix model of one layer (see the module docstring)."""

    def __init__(self, float_model: ModelProto, qmodel: ModelProto):
        self.fm, self.qm = float_model, qmodel
        self.finits = initializers(float_model.graph)
        self.qinits = initializers(qmodel.graph)
        self.qnodes = {n.name: n for n in qmodel.graph.node}
        self.outputs = [o.name for o in float_model.graph.output]
        self.consumers = consumers(float_model.graph)

    def build(self, layer: NodeProto, edges: list[EdgeQuant],
              types: dict[str, int]) -> tuple[ModelProto, list[str], list[str]]:
        nodes: list[NodeProto] = []
        scope = NameScope(self.fm.graph)
        scope.taken |= set(self.qinits)
        new_inits: dict[str, TensorProto] = {}
        suffix = _downstream(self.fm, layer, self.consumers)
        head = onnx.NodeProto()
        head.CopyFrom(layer)
        for e in edges:
            nodes += self._transplant(e, head, scope, new_inits)
        body = [head] + [n for n in suffix if n.name != layer.name]
        produced = {o for n in body for o in n.output if o} | {o for n in nodes for o in n.output}
        reads = [t for n in nodes + body for t in list(n.input) + sorted(subgraph_inputs(n)) if t]
        boundary = [t for t in dict.fromkeys(reads) if t not in produced and t not in self.finits
                    and t not in new_inits]
        inits = [self.finits[t] for t in dict.fromkeys(reads) if t in self.finits and t not in produced]
        local = [o for o in layer.output if o and types.get(o) == TensorProto.FLOAT]
        outs = [o for o in self.outputs if o in produced]
        graph = helper.make_graph(
            nodes + body, f"{layer.name}_isolated",
            [helper.make_tensor_value_info(t, types.get(t, TensorProto.FLOAT), None) for t in boundary],
            [helper.make_tensor_value_info(o, types.get(o, TensorProto.FLOAT), None)
             for o in dict.fromkeys(local + outs)],
            initializer=inits + list(new_inits.values()))
        model = helper.make_model(graph, opset_imports=list(self.qm.opset_import) or list(self.fm.opset_import))
        model.ir_version = max(self.qm.ir_version, self.fm.ir_version)
        return model, local, outs

    def _transplant(self, e: EdgeQuant, head: NodeProto, scope: NameScope,
                    new_inits: dict[str, TensorProto]) -> list[NodeProto]:
        """Copy the QDQ model's DequantizeLinear (and QuantizeLinear) of one edge, renamed."""
        made = []
        rename: dict[str, str] = {}
        chain = [self.qnodes[e.q_node]] if e.q_node else []
        chain.append(self.qnodes[e.dq_node])
        for src in chain:
            node = onnx.NodeProto()
            node.CopyFrom(src)
            node.name = scope.fresh(f"{e.node}_{src.op_type}")
            for i, t in enumerate(node.input):
                if t in self.qinits:
                    if t not in rename:
                        rename[t] = scope.fresh(t)
                        init = TensorProto()
                        init.CopyFrom(self.qinits[t])
                        init.name = rename[t]
                        new_inits[init.name] = init
                    node.input[i] = rename[t]
                elif i == 0 and src.op_type == "QuantizeLinear":
                    node.input[0] = e.tensor
                elif t in rename:
                    node.input[i] = rename[t]
            for i, t in enumerate(node.output):
                rename[t] = scope.fresh(f"{e.tensor}_isolated")
                node.output[i] = rename[t]
            made.append(node)
        head.input[e.slot] = made[-1].output[0]
        return made


@dataclass(frozen=True)
class _LayerJob:
    """What every chunk of layers needs (picklable: it travels once to each worker)."""

    float_model: ModelProto
    qmodel: ModelProto
    qmap: QuantMap
    cache: list[dict[str, np.ndarray]]
    device: str
    progress: Progress | None  # only when the chunks run in this process
    total: int


def _layer_rows(job: _LayerJob, chunk: list[int]) -> list[LayerError]:
    """The ``LayerError`` of the float nodes at positions ``chunk`` (a work unit)."""
    builder = _SuffixBuilder(job.float_model, job.qmodel)
    types = {k: int(helper.np_dtype_to_tensor_dtype(v.dtype)) for k, v in job.cache[0].items()}
    rows = []
    for k in chunk:
        node = job.float_model.graph.node[k]
        t0 = time.perf_counter()
        edges = job.qmap.edges[node.name]
        model, local, outs = builder.build(node, edges, types)
        sess = make_session(model, device=job.device)
        feeds = [i.name for i in sess.get_inputs()]
        names = [o.name for o in sess.get_outputs()]
        acc = {n: FidelityAccumulator() for n in names}
        for i, values in enumerate(job.cache):
            got = run_checked(sess, names, {f: values[f] for f in feeds}, i)
            for n, v in zip(names, got):
                acc[n].update(values[n], np.asarray(v))
        rows.append(dataclasses.replace(_record(k, node, edges, acc, local, outs, job.qmodel, builder.finits),
                                        seconds=time.perf_counter() - t0))
        if job.progress:
            job.progress("layerwise", len(rows), job.total)
    return rows


def layerwise(float_model: ModelProto, qmodel: ModelProto, qmap: QuantMap,
              cache: list[dict[str, np.ndarray]], progress: Progress | None = None,
              device: str = "cpu", executor: Executor | None = None) -> list[LayerError]:
    """One ``LayerError`` per quantized float node, in graph order. The layers are independent
    units: ``executor`` may spread them over worker processes or a Ray cluster, with the same
    result."""
    executor = executor or InProcess()
    here = isinstance(executor, InProcess)
    positions = [k for k, n in enumerate(float_model.graph.node) if n.name in qmap.edges]
    job = _LayerJob(float_model, qmodel, qmap, cache, device, progress if here else None, len(positions))
    parts = 1 if here else 4 * executor.workers  # several chunks per worker even out their costs
    chunks = [positions[len(positions) * i // parts: len(positions) * (i + 1) // parts] for i in range(parts)]
    with executor.pool(job) as pool:
        results = pool.map(_layer_rows, [c for c in chunks if c])
    return [row for rows in results for row in rows]


def _record(depth: int, node: NodeProto, edges: list[EdgeQuant], acc: dict[str, FidelityAccumulator],
            local: list[str], outs: list[str], qmodel: ModelProto, finits: dict) -> LayerError:
    ones = Metrics(1.0, float("inf"), 0.0, 1.0, 0.0, 0.0)
    local_m = acc[local[0]].metrics() if local and acc[local[0]].count else ones
    scored = [(acc[o].metrics(), o) for o in outs if acc[o].count]
    out_m, out_name = max(scored, key=lambda t: t[0].badness) if scored else (ones, "")
    weights = [e for e in edges if e.kind == "weight"]
    w_sqnr = None
    if weights and weights[0].tensor in finits:
        w = numpy_helper.to_array(finits[weights[0].tensor])
        d = dequantized_weight(qmodel, weights[0].dq_node)
        w_sqnr = sqnr_db(w, d) if w.shape == d.shape else None
    return LayerError(node.name, node.op_type, depth + 1,
                      tuple(e.tensor for e in edges if e.kind == "activation"),
                      tuple(e.tensor for e in weights), local_m, out_m, out_name, w_sqnr)
