"""Fold BatchNormalization into the preceding Conv, ConvTranspose or Gemm."""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, numpy_helper

from edgequant.ir.graph import NameScope, consumers, get_attr, initializers, producers
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
    ``b' = (b − μ) · m + β``. Applies only when W (and b) are initializers, the BN is the sole
    consumer of ``y`` and ``y`` is not a graph output. Gemm needs alpha = beta = 1; grouped
    ConvTranspose is left alone.
    """

    name = "fold-batchnorm"

    def __call__(self, model: ModelProto) -> bool:
        graph = model.graph
        changed = False
        for bn in list(graph.node):
            if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
                continue
            if get_attr(bn, "training_mode", 0):
                continue
            if self._fold_one(model, bn):
                changed = True
        return changed

    def _fold_one(self, model: ModelProto, bn) -> bool:
        graph = model.graph
        inits = initializers(graph)
        prod = producers(graph).get(bn.input[0])
        if prod is None or prod.op_type not in FOLDABLE or prod.input[1] not in inits:
            return False
        axis = _weight_axis(prod)
        outputs = {o.name for o in graph.output}
        if axis is None or len(consumers(graph)[bn.input[0]]) != 1 or bn.input[0] in outputs:
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
        scope = NameScope(graph)
        w_name, b_name = scope.fresh(prod.input[1] + "_bnfold"), scope.fresh(bn.output[0] + "_bias")
        graph.initializer.extend([numpy_helper.from_array(new_w, w_name),
                                  numpy_helper.from_array(new_b, b_name)])
        prod.input[1] = w_name
        if len(prod.input) > 2:
            prod.input[2] = b_name
        else:
            prod.input.append(b_name)
        prod.output[0] = bn.output[0]
        graph.node.remove(bn)
        return True
