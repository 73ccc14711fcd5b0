"""Fold BatchNormalization into the preceding Conv, ConvTranspose or Gemm."""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, numpy_helper

from edgequant.ir.graph import NameScope, consumers, get_attr, initializers, producers, remove_nodes
from edgequant.planning.ops import weight_axis

FOLDABLE = {"Conv", "ConvTranspose", "Gemm"}


def _bn_factors(bn, inits) -> tuple[np.ndarray, np.ndarray] | None:
    names = list(bn.input[1:5])
    if len(names) != 4 or not all(n in inits for n in names):
        return None
    gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in names)
    eps = get_attr(bn, "epsilon", 1e-5)
    mul = gamma / np.sqrt(var + eps)
    return mul, beta - mean * mul


def _weight_axis(node) -> int | None:
    """Output-channel axis of the weight, when BN can fold into it (Gemm needs alpha = beta = 1)."""
    attrs = {a.name: get_attr(node, a.name) for a in node.attribute}
    if node.op_type == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
        return None
    return weight_axis(node.op_type, 0, attrs)


class FoldBatchNorm:
    """``x → Conv(W, b) → y → BatchNormalization → z`` becomes ``x → Conv(W', b') → z``.

    With ``m = γ / sqrt(σ² + ε)``: ``W' = W · m`` along the output-channel axis and
    ``b' = (b − μ) · m + β`` (computed in float64). Applies only when W (and b) are
    initializers, the BN is the sole consumer of ``y`` and ``y`` is not a graph output. Gemm
    needs alpha = beta = 1; grouped ConvTranspose is left alone. Linear in the graph: one
    index of producers and consumers, the folded BNs removed at once.
    """

    name = "fold-batchnorm"

    def __call__(self, model: ModelProto) -> bool:
        graph = model.graph
        self.inits = initializers(graph)
        self.producers = producers(graph)
        self.consumers = consumers(graph)
        self.outputs = {o.name for o in graph.output}
        self.scope = NameScope(graph)
        self.new: list = []
        folded = {k for k, bn in enumerate(graph.node)
                  if bn.op_type == "BatchNormalization" and len(bn.output) == 1
                  and not get_attr(bn, "training_mode", 0) and self._fold_one(bn)}
        graph.initializer.extend(self.new)
        remove_nodes(graph, folded)
        return bool(folded)

    def _fold_one(self, bn) -> bool:
        inits = self.inits
        prod = self.producers.get(bn.input[0])
        if prod is None or prod.op_type not in FOLDABLE or prod.input[1] not in inits:
            return False
        axis = _weight_axis(prod)
        if axis is None or len(self.consumers.get(bn.input[0], [])) != 1 or bn.input[0] in self.outputs:
            return False
        factors = _bn_factors(bn, inits)
        if factors is None:
            return False
        mul, add = factors
        w = numpy_helper.to_array(inits[prod.input[1]])
        if w.shape[axis] != mul.shape[0]:
            return False
        bias_name = prod.input[2] if len(prod.input) > 2 and prod.input[2] else None
        if bias_name is not None and bias_name not in inits:
            return False
        b = numpy_helper.to_array(inits[bias_name]).astype(np.float64) if bias_name else 0.0
        if bias_name and np.ndim(b) != 1:
            return False
        shape = [1] * w.ndim
        shape[axis] = -1
        new_w = (w.astype(np.float64) * mul.reshape(shape)).astype(w.dtype)
        new_b = (add + np.asarray(b) * mul).astype(w.dtype)
        w_name, b_name = self.scope.fresh(prod.input[1] + "_bnfold"), self.scope.fresh(bn.output[0] + "_bias")
        for tensor in (numpy_helper.from_array(new_w, w_name), numpy_helper.from_array(new_b, b_name)):
            self.new.append(tensor)
            inits[tensor.name] = tensor
        prod.input[1] = w_name
        if len(prod.input) > 2:
            prod.input[2] = b_name
        else:
            prod.input.append(b_name)
        prod.output[0] = bn.output[0]
        self.producers[bn.output[0]] = prod
        return True
