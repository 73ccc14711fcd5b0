"""Per-layer precision overrides: selectors, rules on the plan, and the model they give."""

import numpy as np
import onnx
import pytest

import edgequant
from edgequant.errors import ConfigError, TensorNameError
from edgequant.ir.model import opset_of
from edgequant.planning.overrides import FLOAT, Override
from edgequant.quant.dtypes import QuantDType
from tests.unit.test_quantize_graphs import calib, cnn, ops


def names(model):
    return [n.name for n in model.graph.node]


def test_parse_and_selectors(rng):
    assert Override.parse("Conv_0=int16") == Override("Conv_0", QuantDType.INT16)
    assert Override.parse(" op:Gemm = float ").precision == FLOAT
    assert str(Override.parse("re:^C=uint16")) == "re:^C=uint16"
    for bad in ("Conv_0", "=int8", "Conv_0=int4", "Conv_0=fp64"):
        with pytest.raises(ConfigError):
            Override.parse(bad)
    model = edgequant.quantize(cnn(rng), calib(rng)).float_model
    nodes = list(model.graph.node)
    conv = [n.name for n in nodes if n.op_type == "Conv"]
    assert [n.name for n in Override.parse("op:Conv=int16").select(nodes)] == conv
    assert [n.name for n in Override.parse("Conv*=int16").select(nodes)] == conv
    assert [n.name for n in Override.parse("re:^Conv_0$=int16").select(nodes)] == ["Conv_0"]
    assert [n.name for n in Override.parse("Conv_0=int16").select(nodes)] == ["Conv_0"]


def test_an_override_that_matches_nothing_names_the_closest(rng):
    with pytest.raises(TensorNameError, match="Conv_0"):
        edgequant.quantize(cnn(rng), calib(rng), overrides=["Conv_O=int16"])
    with pytest.raises(TensorNameError, match="Conv"):
        edgequant.quantize(cnn(rng), calib(rng), overrides=["op:Cnv=float"])
    with pytest.raises(ConfigError, match="regular expression"):
        edgequant.quantize(cnn(rng), calib(rng), overrides=["re:(=float"])


def test_float_layer_keeps_its_inputs_and_weights_float(rng):
    model, data = cnn(rng), calib(rng)
    base = edgequant.quantize(model, data)
    gemm = next(n for n in base.float_model.graph.node if n.op_type == "Gemm")
    r = edgequant.quantize(model, data, overrides=[f"{gemm.name}=float"])
    assert gemm.input[0] not in r.plan.activations and gemm.input[0] in base.plan.activations
    assert not [k for k in r.plan.weights if k[0] == gemm.name]
    assert not [k for k in r.plan.biases if k[0] == gemm.name]
    assert r.plan.precision == {gemm.name: "float"}
    assert r.plan.float_ops["Gemm"] == 1 and "Gemm" not in r.plan.quantized_ops
    q = r.model
    onnx.checker.check_model(q)
    g = next(n for n in q.graph.node if n.op_type == "Gemm")
    inits = {t.name for t in q.graph.initializer}
    assert g.input[1] in inits and g.input[2] in inits  # float weight and bias, no DequantizeLinear
    prod = {o: n.op_type for n in q.graph.node for o in n.output}
    assert prod[g.input[0]] == "Flatten"
    assert r.summary.fidelity[0].cosine >= base.summary.fidelity[0].cosine - 1e-4


def test_int16_layer_changes_the_whole_sharing_group_and_upgrades_opset(rng):
    model, data = cnn(rng), calib(rng)
    base = edgequant.quantize(model, data)
    conv2 = [n for n in base.float_model.graph.node if n.op_type == "Conv"][1]
    r = edgequant.quantize(model, data, overrides=[f"{conv2.name}=int16"])
    x = conv2.input[0]  # the MaxPool output, sharing its parameters with the MaxPool input
    root = r.plan.activations[x].root
    group = [a for a in r.plan.activations.values() if a.root == root]
    assert len(group) == 2 and all(a.dtype == QuantDType.INT16 for a in group)
    others = [a for a in r.plan.activations.values() if a.root != root]
    assert others and all(a.dtype == QuantDType.UINT8 for a in others)
    assert opset_of(r.model) >= 21
    zps = [t for t in r.model.graph.initializer if t.data_type == onnx.TensorProto.INT16]
    assert zps, "16-bit zero points for the overridden tensors"
    assert r.summary.fidelity[0].sqnr_db >= base.summary.fidelity[0].sqnr_db - 0.5


def test_float_consumer_of_a_folded_relu_gets_its_relu_back(rng):
    model, data = cnn(rng), calib(rng)
    base = edgequant.quantize(model, data)
    assert ops(base.model)["Relu"] == 0
    pool = next(n for n in base.float_model.graph.node if n.op_type == "MaxPool")
    r = edgequant.quantize(model, data, overrides=[f"{pool.name}=float"])
    assert ops(r.model)["Relu"] == 1 and "Relu (folded)" not in r.plan.quantized_ops
    x = calib(rng, 1)[0]
    from tests.conftest import run

    ref = run(base.float_model, {"x": x})[0]
    got = run(r.model, {"x": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_overrides_from_the_config_file(rng, tmp_path):
    from edgequant.config.schema import load_config

    cfg = load_config({"quantization_parameters": {"overrides": ["op:Gemm=float", "Conv_0=int16"]}})
    assert cfg.options.overrides == (Override("op:Gemm", FLOAT), Override("Conv_0", QuantDType.INT16))
    with pytest.raises(ConfigError):
        load_config({"quantization_parameters": {"overrides": ["op:Gemm"]}})
