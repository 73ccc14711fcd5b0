"""Raise pre-IR-4 models to an IR version where initializers need not be graph inputs."""

from __future__ import annotations

from onnx import ModelProto, helper


class RaiseIRVersion:
    """IR version 3 and older require every initializer to be listed in ``graph.input``; the
    weights, scales and zero points later passes and Q/DQ insertion add are not, so the
    checker would reject the model. Before: ``ir_version: 3``, inputs ``x, W, B``. After: the
    IR version the model's opsets need (at least 4), inputs ``x``; W and B stay initializers
    (constants, as the quantizer treats them). Models at IR 4 or later are left alone.
    """

    name = "raise-ir-version"

    def __call__(self, model: ModelProto) -> bool:
        if model.ir_version >= 4:
            return False
        graph = model.graph
        model.ir_version = max(4, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
        inits = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        graph.ClearField("input")
        graph.input.extend(inputs)
        return True
