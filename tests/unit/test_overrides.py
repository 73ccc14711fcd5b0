"""Per-layer precision overrides: selectors, rules on the plan, and the model they give."""

import numpy as np
import onnx
import pytest

import edgequant
from edgequant.calibration.method import Method
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
    full = Override.parse("re:head/=int16,weight=int16,percentile=99.9")
    assert (full.precision, full.weight, full.method, full.percentile) == (
        QuantDType.INT16, QuantDType.INT16, Method.PERCENTILE, 99.9)
    assert str(full) == "re:head/=int16,weight=int16,method=percentile,percentile=99.9"
    assert Override.parse("x=level=2").level == 2 and Override.parse("op:Add=method=minmax").method == Method.MINMAX
    for bad in ("Conv_0", "=int8", "Conv_0=int4", "Conv_0=fp64", "a=level=7", "a=colour=red", "a=percentile=x"):
        with pytest.raises(ConfigError):
            Override.parse(bad)
    model = edgequant.quantize(cnn(rng), calib(rng)).float_model
    nodes = list(model.graph.node)
    conv = [n.name for n in nodes if n.op_type == "Conv"]

    def picked(text):
        return [n.name for n in Override.parse(text).selector.select(model)]

    assert picked("op:Conv=int16") == conv and picked("Conv*=int16") == conv
    assert picked("re:^Conv_0$=int16") == ["Conv_0"] and picked("Conv_0=int16") == ["Conv_0"]


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
    assert gemm.name not in r.plan.weights and gemm.name not in r.plan.biases
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


BRANCHY = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4] x, float[N, 4] bypass) => (float[N, 4] y) {
    a = MatMul (x, W1)
    b = Relu (a)
    side = MatMul (bypass, W2)
    c = Add (b, side)
    d = MatMul (c, W3)
    post = Sigmoid (d)
    y = Mul (post, post)
}
"""


def branchy(rng):
    from onnx import numpy_helper

    from tests.conftest import parse

    m = parse(BRANCHY, check=False)
    for name in ("W1", "W2", "W3"):
        m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), name))
    return m


def feeds(rng, n=12):
    return [{"x": rng.standard_normal((1, 4)).astype(np.float32),
             "bypass": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(n)]


def test_selectors_capture_exact_regions(rng):
    from edgequant.planning.selectors import After, Before, Between

    model = edgequant.quantize(branchy(rng), feeds(rng)).float_model
    ops_of = {n.name: n.op_type for n in model.graph.node}

    def pick(sel):
        return [ops_of[n.name] for n in sel.select(model)]

    # custom_setting: from x to c — the bypass MatMul joins from outside and is not captured
    assert pick(Between(("x",), ("c",))) == ["MatMul", "Relu", "Add"]
    assert pick(Between(("c",), ("y",))) == ["MatMul", "Sigmoid", "Mul"]
    assert pick(After(("d",))) == ["Sigmoid", "Mul"]
    assert pick(After(("d",), inclusive=True, what="--float-after")) == ["MatMul", "Sigmoid", "Mul"]
    assert pick(Before("b")) == ["MatMul", "Relu"]
    with pytest.raises(TensorNameError, match="closest"):
        Between(("x",), ("cc",)).select(model)
    with pytest.raises(TensorNameError, match="no path"):
        Between(("bypass",), ("b",)).select(model)
    with pytest.raises(ConfigError, match="model output"):
        After(("y",)).select(model)
    with pytest.raises(ConfigError, match="model input"):
        After(("x",)).select(model)


def test_region_float_keeps_post_processing_float_and_rest_int8(rng):
    from edgequant.planning.selectors import After

    m, data = branchy(rng), feeds(rng)
    r = edgequant.quantize(m, data, overrides=[Override(After(("d",)), FLOAT)])
    assert "d" not in r.plan.activations and "post" not in r.plan.activations
    # everything before d stays int8: the inputs, the side branch, the Add, and a's Relu (folded into
    # the MatMul, so its output b is what is quantized, a is not)
    assert set(r.plan.activations) == {"x", "bypass", "b", "side", "c"}
    q = r.model
    onnx.checker.check_model(q)
    prod = {o: n.op_type for n in q.graph.node for o in n.output}
    sig = next(n for n in q.graph.node if n.op_type == "Sigmoid")
    assert prod[sig.input[0]] == "MatMul"  # reads the MatMul's float output, no DequantizeLinear


def test_precision_levels(rng):
    m, data = branchy(rng), feeds(rng)
    base = edgequant.quantize(m, data)
    two = edgequant.quantize(m, data, overrides=[Override("re:.*", level=2)])
    assert {a.dtype for a in two.plan.activations.values()} == {QuantDType.INT16}
    assert {w.dtype for _, w in two.plan.weight_items()} == {QuantDType.INT8}
    three = edgequant.quantize(m, data, overrides=[Override("re:.*", level=3)])
    assert {w.dtype for _, w in three.plan.weight_items()} == {QuantDType.INT16}
    four = edgequant.quantize(m, data, overrides=[Override("re:.*", level=4)])
    assert not four.plan.weights and not four.plan.biases
    assert four.summary.fidelity[0].sqnr_db > two.summary.fidelity[0].sqnr_db > base.summary.fidelity[0].sqnr_db
    one = edgequant.quantize(m, data, overrides=[Override("re:.*", level=1)])
    sq = next(n for n in one.float_model.graph.node if n.op_type == "Mul")  # Mul(post, post): a square
    assert one.plan.activations[sq.input[0]].dtype == QuantDType.INT16
    conv_in = next(n for n in one.float_model.graph.node if n.op_type == "MatMul").input[0]
    assert one.plan.activations[conv_in].dtype == QuantDType.UINT8
    zero = edgequant.quantize(m, data, overrides=[Override("re:.*", level=2), Override("op:Sigmoid", level=0)])
    sig = next(n for n in zero.float_model.graph.node if n.op_type == "Sigmoid")
    assert zero.plan.activations[sig.input[0]].dtype == QuantDType.UINT8


def test_tensor_selector_and_per_tensor_method(rng):
    m, data = branchy(rng), feeds(rng)
    r = edgequant.quantize(m, data, overrides=["tensor:d=uint16", "op:Sigmoid=method=minmax"])
    assert r.plan.activations["d"].dtype == QuantDType.UINT16
    root = r.plan.activations["d"].root
    from edgequant.calibration.method import Method

    assert r.plan.calibration[root][0] is Method.MINMAX
    lo, hi = r.ranges[root]
    float_d = [edgequant.quantize(m, data, method="minmax").ranges[root]]
    assert (lo, hi) == float_d[0]
    with pytest.raises(TensorNameError, match="matches no quantized tensor"):
        edgequant.quantize(m, data, overrides=["tensor:dd=int16"])
