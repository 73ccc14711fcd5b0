"""Constant nodes become initializers; nodes whose inputs are all constant are evaluated."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

from edgequant.ir.graph import consumers, has_subgraph, remove_nodes, static_shapes

log = logging.getLogger(__name__)

#: Ops never folded: random, stateful or side-effecting.
NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                "Multinomial", "Bernoulli", "QuantizeLinear", "DequantizeLinear"}
MAX_FOLDED_ELEMENTS = 16_000_000


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is None:
        return None
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name in ("value_float", "value_int"):
        return np.array(helper.get_attribute_value(attr),
                        dtype=np.float32 if attr.name == "value_float" else np.int64)
    if attr.name in ("value_floats", "value_ints"):
        return np.array(list(helper.get_attribute_value(attr)),
                        dtype=np.float32 if attr.name == "value_floats" else np.int64)
    return None  # sparse or string constants stay as nodes


class ConstantsToInitializers:
    """``Constant(value=T) → x`` becomes the initializer ``x = T`` (weights in Paddle exports).

    Constants that are graph outputs stay nodes (a graph output must be produced).
    """

    name = "constants-to-initializers"

    def __call__(self, model: ModelProto) -> bool:
        graph = model.graph
        outputs = {o.name for o in graph.output}
        lifted = set()
        for k, node in enumerate(graph.node):
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            if node.output[0] in outputs:
                continue
            value = _constant_value(node)
            if value is None:
                continue
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            lifted.add(k)
        remove_nodes(graph, lifted)
        return bool(lifted)


class FoldConstants:
    """Evaluate nodes whose inputs are all initializers and store their outputs as initializers.

    ``Shape`` of a tensor with a fully static shape folds too. Before:
    ``W → Transpose → Wt → MatMul``; after: ``Wt`` (initializer) ``→ MatMul``.
    Nodes with subgraphs, random ops and outputs over 16M elements are left alone.
    """

    name = "fold-constants"

    def __call__(self, model: ModelProto) -> bool:
        graph = model.graph
        values = {t.name: t for t in graph.initializer}
        outputs = {o.name for o in graph.output}
        shapes = static_shapes(graph)
        opset = [imp for imp in model.opset_import]
        folded_nodes: set[int] = set()
        for k, node in enumerate(graph.node):
            if node.domain not in ("", "ai.onnx") or node.op_type in NOT_FOLDABLE:
                continue
            if has_subgraph(node) or any(o in outputs for o in node.output):
                continue
            folded = self._fold_shape(node, shapes) if node.op_type == "Shape" else None
            if folded is None:
                if not all((not i) or i in values for i in node.input):
                    continue
                folded = self._evaluate(node, values, opset)
            if folded is None:
                continue
            for name, arr in zip(node.output, folded):
                if name:
                    tensor = numpy_helper.from_array(np.asarray(arr), name)
                    graph.initializer.append(tensor)
                    values[name] = tensor
            folded_nodes.add(k)
        remove_nodes(graph, folded_nodes)
        if folded_nodes:
            drop_unused_initializers(model)
        return bool(folded_nodes)

    @staticmethod
    def _fold_shape(node, shapes) -> list[np.ndarray | None] | None:
        shape = shapes.get(node.input[0])
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            return None
        start = next((a.i for a in node.attribute if a.name == "start"), 0)
        end = next((a.i for a in node.attribute if a.name == "end"), None)
        return [np.array(shape[start:end], dtype=np.int64)]

    @staticmethod
    def _evaluate(node, values, opset) -> list[np.ndarray | None] | None:
        from onnx.reference import ReferenceEvaluator  # heavy import, only when something folds

        try:
            inputs = [helper.make_tensor_value_info(i, values[i].data_type, None)
                      for i in node.input if i]
            outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
            g = helper.make_graph([node], "fold", inputs, outs,
                                  initializer=[values[i] for i in node.input if i])
            m = helper.make_model(g, opset_imports=opset)
            result = ReferenceEvaluator(m).run(None, {})
        except Exception as exc:
            log.debug("could not fold %s (%s): %s", node.name, node.op_type, exc)
            return None
        if any(np.asarray(r).size > MAX_FOLDED_ELEMENTS for r in result):
            return None
        full = iter(result)
        return [next(full) if o else None for o in node.output]


def drop_unused_initializers(model: ModelProto) -> None:
    """Remove initializers nothing reads (and their entries in ``graph.input``, old IR style)."""
    graph = model.graph
    used = set(consumers(graph)) | {o.name for o in graph.output}
    dropped = {t.name for t in graph.initializer if t.name not in used}
    if not dropped:
        return
    keep = [t for t in graph.initializer if t.name not in dropped]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in dropped]
    graph.ClearField("input")
    graph.input.extend(inputs)


class DivideByConstantToMul:
    """``x / c`` with a float constant ``c`` becomes ``x · (1 / c)``: onnxruntime has no
    integer Div, but runs the Mul as QLinearMul (HardSwish's ``/ 6`` in PP-LCNet and
    MobileNetV3 exports). The product differs from the quotient by at most one rounding of
    1/c (relative 6e-8 in float32). Divisors with a zero stay Divs."""

    name = "divide-by-constant-to-mul"

    def __call__(self, model: ModelProto) -> bool:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        scope = None
        changed = False
        for node in graph.node:
            if node.op_type != "Div" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
                continue
            t = inits.get(node.input[1])
            if t is None or t.data_type != onnx.TensorProto.FLOAT:
                continue
            c = numpy_helper.to_array(t)
            if not c.size or not np.all(np.isfinite(c)) or np.any(c == 0):
                continue
            if scope is None:
                from edgequant.ir.graph import NameScope

                scope = NameScope(graph)
            name = scope.fresh(f"{t.name}_reciprocal")
            graph.initializer.append(numpy_helper.from_array((np.float32(1.0) / c).astype(np.float32), name))
            node.op_type = "Mul"
            node.input[1] = name
            changed = True
        return changed
