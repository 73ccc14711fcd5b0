"""Plan and Q/DQ insertion on small graphs: structure, dtypes, axes, numbers, determinism."""

import collections

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import edgequant
from edgequant.calibration.method import Method
from edgequant.ir.model import opset_of
from edgequant.passes import prepare_model
from edgequant.planning import QuantOptions, build_plan
from tests.conftest import parse, run


def with_weights(text: str, rng, **shapes) -> onnx.ModelProto:
    m = parse(text, check=False)
    for name, shape in shapes.items():
        m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.checker.check_model(m)
    return m


CNN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] x) => (float[N, 10] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
    c2 = Conv (p1, W2, B2)
    a = Add (c2, c2)
    f = Flatten (a)
    y = Gemm <transB = 1> (f, W3, B3)
}
"""


def cnn(rng):
    return with_weights(CNN, rng, W1=(4, 3, 3, 3), B1=(4,), W2=(4, 4, 1, 1), B2=(4,), W3=(10, 64), B3=(10,))


def calib(rng, n=20, shape=(1, 3, 8, 8)):
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def test_cnn_layout_dtypes_and_axes(rng):
    result = edgequant.quantize(cnn(rng), calib(rng))
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    c = ops(q)
    assert c["Relu"] == 0, "Relu folded into the Conv output quantization"
    assert c["Conv"] == 2 and c["Gemm"] == 1 and c["MaxPool"] == 1
    inits = {t.name: t for t in q.graph.initializer}
    dq_weights = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                  and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    axes = sorted(helper.get_attribute_value(a) for n in dq_weights for a in n.attribute if a.name == "axis")
    assert axes == [0, 0, 0]  # Conv weights axis 0, Gemm transB=1 axis 0
    q_nodes = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in q_nodes)
    biases = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
              and inits[n.input[0]].data_type == onnx.TensorProto.INT32]
    assert len(biases) == 3
    assert "y" not in {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}  # output stays float


def test_bias_scale_equals_input_scale_times_weight_scale(rng):
    result = edgequant.quantize(cnn(rng), calib(rng))
    q = result.model
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    prod = {o: n for n in q.graph.node for o in n.output}
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    x_dq, w_dq, b_dq = (prod[i] for i in conv.input)
    np.testing.assert_allclose(inits[b_dq.input[1]], inits[x_dq.input[1]] * inits[w_dq.input[1]], rtol=1e-6)


def test_quantized_outputs_close_to_float_and_deterministic(rng):
    model = cnn(rng)
    data = calib(np.random.default_rng(3), 30)
    a = edgequant.quantize(model, data)
    b = edgequant.quantize(model, data)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    x = np.concatenate(data[:8])
    ref, got = run(model, {"x": x})[0], run(a.model, {"x": x})[0]
    from edgequant.analysis import cosine

    assert cosine(ref, got) > 0.99
    assert a.summary.fidelity[0].cosine > 0.99


def test_onnxruntime_fuses_into_integer_kernels(rng, tmp_path):
    import onnxruntime as ort

    q = edgequant.quantize(cnn(rng), calib(rng)).model
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fused = ops(onnx.load(str(tmp_path / "opt.onnx")))
    assert fused["QLinearConv"] == 2 and fused["Conv"] == 0


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_method_runs(method, rng):
    r = edgequant.quantize(cnn(rng), calib(rng), method=method)
    assert r.summary.fidelity[0].cosine > 0.95


def test_per_tensor_symmetric_int8_activations(rng):
    r = edgequant.quantize(cnn(rng), calib(rng), per_channel=False, activation_dtype="int8",
                           activation_symmetric=True)
    q = r.model
    assert not any(a.name == "axis" for n in q.graph.node for a in n.attribute)
    assert ops(q)["Relu"] == 1, "symmetric activations cannot absorb the Relu"
    zps = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("zero_point")]
    assert all((z == 0).all() for z in zps)


def test_16bit_activations_upgrade_opset(rng):
    r = edgequant.quantize(cnn(rng), calib(rng), activation_dtype="int16")
    assert opset_of(r.model) == 21
    onnx.checker.check_model(r.model)
    assert r.summary.fidelity[0].sqnr_db > edgequant.quantize(cnn(rng), calib(rng)).summary.fidelity[0].sqnr_db


def test_per_channel_upgrades_old_opset(rng):
    m = cnn(rng)
    m.opset_import[0].version = 11
    r = edgequant.quantize(m, calib(rng))
    assert opset_of(r.model) == 13 and r.summary.opset == (11, 13)


def test_convtranspose_and_matmul_axes(rng):
    m = with_weights("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4, 5, 5] x) => (float[1, 6, 11, 3] y) {
        t = ConvTranspose <strides = [2, 2]> (x, WT, BT)
        y = MatMul (t, WM)
    }""", rng, WT=(4, 6, 3, 3), BT=(6,), WM=(11, 3))
    q = edgequant.quantize(m, calib(rng, shape=(1, 4, 5, 5))).model
    axes = {n.input[0]: helper.get_attribute_value(a) for n in q.graph.node if n.op_type == "DequantizeLinear"
            for a in n.attribute if a.name == "axis"}
    assert axes["WT_quantized"] == 1 and axes["WM_quantized"] == 1


def test_reshape_like_ops_share_their_input_parameters(rng):
    m = with_weights("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4, 4, 4] x) => (float[1, 8] y) {
        c = Conv (x, W)
        t = Transpose <perm = [0, 2, 3, 1]> (c)
        f = Flatten (t)
        y = MatMul (f, WM)
    }""", rng, W=(4, 4, 1, 1), WM=(64, 8))
    prepare_model(m)
    plan = build_plan(m, QuantOptions())
    assert plan.activations["t"].root == "c" and plan.activations["f"].root == "c"
    assert plan.roots == ["x", "c"]


def test_unsupported_ops_stay_float_and_integer_inputs_work(rng):
    m = with_weights("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (int64[N, 5] ids) => (float[N, 5, 3] y) {
        e = Gather (E, ids)
        s = Sin (e)
        y = MatMul (s, WM)
    }""", rng, E=(20, 4), WM=(4, 3))
    data = [rng.integers(0, 20, (1, 5)).astype(np.int64) for _ in range(10)]
    r = edgequant.quantize(m, data)
    assert r.summary.float_ops.get("Sin") == 1
    assert "ids" not in r.plan.activations
    x = np.stack([d[0] for d in data])
    assert edgequant.analysis.cosine(run(m, {"ids": x})[0], run(r.model, {"ids": x})[0]) > 0.99


def test_if_bodies_are_reported_left_float(rng):
    then_g = helper.make_graph([helper.make_node("Relu", ["c"], ["o"])], "then", [],
                               [helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [1, 4, 4, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["c"], ["o2"])], "else", [],
                               [helper.make_tensor_value_info("o2", onnx.TensorProto.FLOAT, [1, 4, 4, 4])])
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 4, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 4, 4])],
                          [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "W"),
                           numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    r = edgequant.quantize(m, calib(rng, shape=(1, 4, 4, 4)))
    assert r.summary.subgraph_float_ops == 2
    assert r.summary.quantized_ops["Conv"] == 1
    x = calib(rng, 1, (1, 4, 4, 4))[0]
    assert edgequant.analysis.cosine(run(m, {"x": x})[0], run(r.model, {"x": x})[0]) > 0.99


def test_external_data_model_loads(rng, tmp_path):
    m = cnn(rng)
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    r = edgequant.quantize(path, calib(rng))
    out = r.save(tmp_path / "q.onnx")
    onnx.checker.check_model(str(out))


def test_constant_node_weights_are_quantized_as_weights(rng):
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w))
    conv = helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["y"], ["z"])
    g = helper.make_graph([const, conv, relu], "paddle_like",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 4, 8, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)
    r = edgequant.quantize(m, calib(rng))
    assert [w.tensor for _, w in r.plan.weight_items()] == ["W"]
    int8 = {t.name: tuple(t.dims) for t in r.model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert int8["W_quantized"] == (4, 3, 3, 3)


def test_tensor_groups_give_the_same_ranges_as_one_pass(rng):
    from edgequant.calibration.collect import collect_ranges, group_tensors
    from edgequant.data import model_inputs, open_calibration

    assert group_tensors([5, 5, 5, 20, 1], budget=10) == [[0, 1], [2], [3], [4]]
    m = cnn(rng)
    prepare_model(m)
    plan = build_plan(m, QuantOptions())
    src = open_calibration(calib(rng, 12), model_inputs(m))
    calls: list[tuple] = []
    one, n1 = collect_ranges(m, plan.roots, src, Method.PERCENTILE, 99.99, 12, progress=lambda *a: calls.append(a))
    assert {c[0] for c in calls} == {"calibrating"}  # one pass: nothing to group
    calls.clear()
    many, n2 = collect_ranges(m, plan.roots, src, Method.PERCENTILE, 99.99, 12, budget=1,  # one tensor a group
                              progress=lambda *a: calls.append(a))
    assert n1 == n2 == 12
    groups = [c for c in calls if c[0] != "calibrating"]
    # one bar ("calibrating"), counting samples, its note saying which pass and why
    assert groups and all(c[0].startswith("calibrating · tensor group ") and "budget" in c[0] for c in groups)
    assert {c[2] for c in calls} == {12} and max(c[1] for c in calls) == 12
    assert len(plan.roots) > 2
    for name in plan.roots:
        assert one[name].range(edgequant.QuantDType.UINT8, False) == many[name].range(edgequant.QuantDType.UINT8, False)


def test_dead_channel_keeps_its_bias(rng, caplog):
    model = cnn(rng)
    w = next(t for t in model.graph.initializer if t.name == "W1")
    arr = numpy_helper.to_array(w).copy()
    arr[1] = 1e-11  # a channel pruned to ~0 whose bias still matters
    w.CopyFrom(numpy_helper.from_array(arr, "W1"))
    b = next(t for t in model.graph.initializer if t.name == "B1")
    barr = numpy_helper.to_array(b).copy()
    barr[1] = 3.0
    b.CopyFrom(numpy_helper.from_array(barr, "B1"))
    data = calib(rng)
    with caplog.at_level("WARNING"):
        result = edgequant.quantize(model, data)
    assert "overflowed" not in caplog.text
    assert result.summary.fidelity[0].cosine > 0.999


RNNS = {
    "LSTM": (4, """
<ir_version: 8, opset_import: ["" : 14]>
g (float[5, 1, 6] x, float[1, 1, 8] h0, float[1, 1, 8] c0) => (float[5, 1, 1, 8] y, float[1, 1, 8] h, float[1, 1, 8] c) {
    y, h, c = LSTM <hidden_size = 8> (x, W, R, B, , h0, c0)
}
"""),
    "GRU": (3, """
<ir_version: 8, opset_import: ["" : 14]>
g (float[5, 1, 6] x, float[1, 1, 8] h0) => (float[5, 1, 1, 8] y, float[1, 1, 8] h) {
    y, h = GRU <hidden_size = 8, linear_before_reset = 1> (x, W, R, B, , h0)
}
"""),
}


@pytest.mark.parametrize("op", sorted(RNNS))
def test_recurrent_weights_and_states_are_quantized(op, rng):
    gates, text = RNNS[op]
    model = with_weights(text, rng, W=(1, gates * 8, 6), R=(1, gates * 8, 8), B=(1, 2 * gates * 8))
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 0.3, t.name))
    inputs = [i.name for i in model.graph.input]
    data = [{n: rng.standard_normal((5, 1, 6) if n == "x" else (1, 1, 8)).astype(np.float32) for n in inputs}
            for _ in range(20)]
    q = edgequant.quantize(model, data).model
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    cell = next(n for n in q.graph.node if n.op_type == op)
    for slot in (1, 2):  # W and R: per output row (gate × hidden), axis 1
        node = dq[cell.input[slot]]
        assert helper.get_attribute_value(node.attribute[0]) == 1
    assert cell.input[3] == "B"  # the bias is added inside the cell: stays float
    assert all(cell.input[i] in dq for i in [0] + list(range(5, len(cell.input))) if cell.input[i])
    feed = data[0]
    for ref, got in zip(run(model, feed), run(q, feed)):
        assert np.abs(ref - got).max() < 0.05


def _kernels(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    """The op types onnxruntime runs after its graph optimizations (its saved optimized model)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


AFFINE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, W, B)
    s = Add (c, K)
    m = Mul (G, s)
    y = Conv <pads = [1, 1, 1, 1]> (m, W2, B2)
}
"""


def test_generic_target_quantizes_constant_operands_so_onnxruntime_fuses_integer_kernels(rng, tmp_path):
    m = parse(AFFINE, check=False)
    for name, shape in {"W": (4, 3, 3, 3), "B": (4,), "W2": (4, 4, 3, 3), "B2": (4,)}.items():
        m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    m.graph.initializer.extend([numpy_helper.from_array(np.array(3.0, np.float32), "K"),
                                numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 4, 1, 1)).astype(np.float32), "G")])
    onnx.checker.check_model(m)
    data = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(24)]
    generic = edgequant.quantize(m, data)
    kernels = _kernels(generic.model, tmp_path)
    assert kernels["QLinearAdd"] == 1 and kernels["QLinearMul"] == 1 and kernels["QLinearConv"] == 1, kernels
    assert "Add" not in kernels and "Mul" not in kernels  # no float op between a DQ and a Q
    k = next(n for n in generic.model.graph.node if n.op_type == "Add").input[1]
    assert k.endswith("_dequantized")  # 3.0 arrives through an 8-bit DequantizeLinear...
    x = data[0]
    ref, got = run(m, {"x": x})[0], run(generic.model, {"x": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.999
    off = edgequant.quantize(m, data, quantize_constants=False)  # ...which NPU targets leave to their toolchain
    assert _kernels(off.model, tmp_path)["Add"] == 1
    npu = edgequant.quantize(m, data, target="tpu-mlir")
    assert not next(n for n in npu.model.graph.node if n.op_type == "Add").input[1].endswith("_dequantized")
