"""Quantization inside the If branches that stay (edgequant.bodies): a condition on the data,
which no specialization can fold."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgequant
from edgequant.ir.graph import bodies


def _conv_branch(name: str, weight: str, scale: float | None, nested: onnx.GraphProto | None = None) -> onnx.GraphProto:
    """x → (x · scale) → Conv(weight, local bias) → Relu → y; with ``nested``, y goes through an
    If of its own (on max(x) > 1) first."""
    rng = np.random.default_rng(len(name))
    nodes, inits, src = [], [numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), f"{name}_b")], "x"
    if scale is not None:
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}_k"))
        nodes.append(helper.make_node("Mul", ["x", f"{name}_k"], [f"{name}_xs"], name=f"{name}_mul"))
        src = f"{name}_xs"
    nodes.append(helper.make_node("Conv", [src, weight, f"{name}_b"], [f"{name}_c"], name=f"{name}_conv", pads=[1] * 4))
    nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu"))
    out = f"{name}_r"
    if nested is not None:
        nodes.append(helper.make_node("ReduceMax", ["x"], [f"{name}_m"], name=f"{name}_max", keepdims=0))
        nodes.append(helper.make_node("Greater", [f"{name}_m", "one"], [f"{name}_big"], name=f"{name}_gt"))
        nodes.append(helper.make_node("If", [f"{name}_big"], [f"{name}_y"], name=f"{name}_if", then_branch=nested,
                                      else_branch=helper.make_graph(
                                          [helper.make_node("Identity", [out], [f"{name}_id"], name=f"{name}_idn")],
                                          f"{name}_else", [], [helper.make_tensor_value_info(f"{name}_id", TensorProto.FLOAT, None)])))
        out = f"{name}_y"
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)


def _model() -> onnx.ModelProto:
    """If(mean(x) > 0): both branches read the main graph's weight ``w``; the then branch
    holds an If of its own, whose then branch convolves the outer branch's output."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w")
    inner = helper.make_graph(
        [helper.make_node("Conv", ["t_r", "w"], ["in_c"], name="in_conv", pads=[1] * 4),
         helper.make_node("Sigmoid", ["in_c"], ["in_s"], name="in_sig")],
        "inner", [], [helper.make_tensor_value_info("in_s", TensorProto.FLOAT, None)])
    then = _conv_branch("t", "w", None, nested=inner)
    other = _conv_branch("e", "w", 2.0)
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], name="mean", keepdims=0),
             helper.make_node("Greater", ["mean", "zero"], ["positive"], name="gt"),
             helper.make_node("If", ["positive"], ["y"], name="branch", then_branch=then, else_branch=other),
             helper.make_node("Add", ["y", "x"], ["z"], name="residual")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [w, numpy_helper.from_array(np.array(0, np.float32), "zero"),
                               numpy_helper.from_array(np.array(1, np.float32), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _samples(n: int, shifts=(0.5, -0.5)) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [(rng.normal(0, 0.5, (1, 4, 8, 8)) + shifts[i % len(shifts)]).astype(np.float32) for i in range(n)]


def _branch_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    node = next(n for n in model.graph.node if n.op_type == "If")
    return {a.name: [n.op_type for n in a.g.node] for a in node.attribute}


def _run(model: onnx.ModelProto, xs) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [sess.run(None, {"x": x})[0] for x in xs]


def test_if_branches_that_stay_are_quantized_on_the_samples_that_take_them():
    model = _model()
    data = _samples(40)
    result = edgequant.quantize(model, data, repair=False)
    onnx.checker.check_model(result.model, full_check=True)  # names unique across the graphs (SSA)
    ops = _branch_ops(result.model)
    for attr in ("then_branch", "else_branch"):
        assert "QuantizeLinear" in ops[attr] and "DequantizeLinear" in ops[attr], ops[attr]
    then = next(a.g for n in result.model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    inner = next(a.g for n in then.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert "DequantizeLinear" in [n.op_type for n in inner.node]  # the nested If's branch as well
    for g in [result.model.graph, *(b for n in result.model.graph.node for b in bodies(n))]:
        for n in g.node:
            if n.op_type == "Conv":  # weight and activation arrive through DequantizeLinear
                producers = {o: m.op_type for gg in [result.model.graph, *(b for m in result.model.graph.node for b in bodies(m))]
                             for m in gg.node for o in m.output}
                assert producers.get(n.input[0]) == "DequantizeLinear" and producers.get(n.input[1]) == "DequantizeLinear"
    # the float weight ``w`` only the branches read is quantized inside them and leaves the main graph
    assert "w" not in {t.name for t in result.model.graph.initializer}
    s = result.summary
    assert s.quantized_ops["Conv"] == 3 and s.subgraph_float_ops < 10, (s.quantized_ops, s.subgraph_float_ops)
    assert any(n.startswith("If branch: then branch quantized on the 16 calibration samples") for n in s.notes), s.notes
    eight, macs = s.eight_bit_macs
    assert macs > 0 and eight == macs
    test = _samples(20, shifts=(0.6, -0.6, 0.4, -0.4))
    for a, b in zip(_run(model, test), _run(result.model, test)):
        cos = float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos > 0.995 and np.abs(a - b).max() < 0.1 * np.abs(a).max()
    again = edgequant.quantize(model, data, repair=False)
    assert again.model.SerializeToString() == result.model.SerializeToString()


def test_float_bodies_and_branches_no_sample_takes_stay_float():
    model = _model()
    plain = edgequant.quantize(model, _samples(40), repair=False, quantize_bodies=False)
    assert all("QuantizeLinear" not in ops for ops in _branch_ops(plain.model).values())
    configured = edgequant.quantize(model, _samples(40), config={"quantization_parameters": {"quantize_bodies": False}},
                                    repair=False)
    assert configured.model.SerializeToString() == plain.model.SerializeToString()
    assert plain.summary.subgraph_float_ops == sum(len(g.node) for n in model.graph.node for g in bodies(n))
    positive = edgequant.quantize(model, _samples(40, shifts=(0.5,)), repair=False)
    ops = _branch_ops(positive.model)
    assert "QuantizeLinear" in ops["then_branch"] and "QuantizeLinear" not in ops["else_branch"]
    assert any("its else branch (3 ops) is taken by no calibration sample and stays float" in n
               for n in positive.summary.notes), positive.summary.notes
    onnx.checker.check_model(positive.model, full_check=True)


def test_parameter_files_say_they_leave_the_quantized_branches_out(tmp_path):
    from edgequant.errors import ConfigError
    from edgequant.export import export_params

    result = edgequant.quantize(_model(), _samples(40), repair=False)
    export_params(result, "qparams", tmp_path / "q.json")
    assert any("the qparams file describes the enclosing graph's tensors; the 2 quantized If branches" in n
               for n in result.summary.notes), result.summary.notes
    with pytest.raises(ConfigError, match="quantize with --float-bodies to export it"):
        export_params(result, "edgequant", tmp_path / "e.json")
    assert not (tmp_path / "e.json").exists()
    flat = edgequant.quantize(_model(), _samples(40), repair=False, quantize_bodies=False)
    export_params(flat, "edgequant", tmp_path / "e.json")


def _loop_model() -> onnx.ModelProto:
    """A Loop whose trip count is computed from the data (floor(max(x)) + 3): h ← tanh(h·W + b) + x."""
    rng = np.random.default_rng(2)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["mm"], name="mm"),
         helper.make_node("Add", ["mm", "b"], ["ab"], name="bias"),
         helper.make_node("Tanh", ["ab"], ["t"], name="tanh"),
         helper.make_node("Add", ["t", "x"], ["hn"], name="carry"),
         helper.make_node("Identity", ["hn"], ["hs"], name="scan"),
         helper.make_node("Identity", ["c"], ["c_out"], name="keep")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("hs", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b")])
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], name="max", keepdims=0),
             helper.make_node("Floor", ["mx"], ["fl"], name="floor"),
             helper.make_node("Add", ["fl", "three"], ["f3"], name="plus"),
             helper.make_node("Cast", ["f3"], ["trips"], name="cast", to=TensorProto.INT64),
             helper.make_node("Loop", ["trips", "yes", "x"], ["h_final", "h_all"], name="recur", body=body)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("h_final", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), "w"),
                               numpy_helper.from_array(np.array(3, np.float32), "three"),
                               numpy_helper.from_array(np.array(True), "yes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_loop_body_that_stays_is_quantized_on_its_iterations():
    model = _loop_model()
    rng = np.random.default_rng(3)
    data = [rng.uniform(0, 2, (1, 8)).astype(np.float32) for _ in range(30)]
    result = edgequant.quantize(model, data, repair=False)
    onnx.checker.check_model(result.model, full_check=True)
    loop = next(n for n in result.model.graph.node if n.op_type == "Loop")
    body = loop.attribute[0].g
    ops = [n.op_type for n in body.node]
    assert "QuantizeLinear" in ops and [i.name for i in body.input] == ["i", "c", "h"]
    made = {o: n.op_type for n in body.node for o in n.output}
    mm = next(n for n in body.node if n.op_type == "MatMul")
    assert made[mm.input[0]] == "DequantizeLinear" and made[mm.input[1]] == "DequantizeLinear"
    assert result.summary.quantized_ops["MatMul"] == 1
    assert any(n.startswith("Loop recur: body quantized on 24 of its iterations") for n in result.summary.notes), \
        result.summary.notes
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    qsess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in [rng.uniform(0, 2, (1, 8)).astype(np.float32) for _ in range(10)]:
        a, b = sess.run(None, {"x": x})[0].ravel(), qsess.run(None, {"x": x})[0].ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999


def test_a_body_that_cannot_be_calibrated_stays_float_and_the_model_is_still_written():
    """Carried values that grow each iteration cannot be stacked as scan outputs: that body
    stays float, with a note, and the rest of the model is quantized as before."""
    body = helper.make_graph(
        [helper.make_node("Concat", ["h", "x"], ["hn"], name="grow", axis=1),
         helper.make_node("Identity", ["c"], ["c_out"], name="keep")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, None])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, None])])
    w = numpy_helper.from_array(np.random.default_rng(4).normal(0, 0.3, (8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
             helper.make_node("ReduceMax", ["x"], ["mx"], name="max", keepdims=0),
             helper.make_node("Floor", ["mx"], ["fl"], name="floor"),
             helper.make_node("Add", ["fl", "three"], ["f3"], name="plus"),
             helper.make_node("Cast", ["f3"], ["trips"], name="cast", to=TensorProto.INT64),
             helper.make_node("Loop", ["trips", "yes", "xw"], ["h_final"], name="recur", body=body)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("h_final", TensorProto.FLOAT, [1, None])],
                              [w, numpy_helper.from_array(np.array(3, np.float32), "three"),
                               numpy_helper.from_array(np.array(True), "yes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rng = np.random.default_rng(5)
    result = edgequant.quantize(model, [rng.uniform(0, 2, (1, 8)).astype(np.float32) for _ in range(20)], repair=False)
    assert any(n.startswith("Loop recur: its body stays float (") for n in result.summary.notes), result.summary.notes
    assert result.summary.quantized_ops["MatMul"] == 1
    onnx.checker.check_model(result.model, full_check=True)


def test_a_scan_body_is_quantized_on_its_steps():
    """A Scan over a sequence of any length (an RNN cell as a body): h ← tanh(x_t·W + h·U)."""
    rng = np.random.default_rng(6)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["xt", "wx"], ["a"], name="in_proj"),
         helper.make_node("MatMul", ["h", "wh"], ["b"], name="rec_proj"),
         helper.make_node("Add", ["a", "b"], ["s"], name="sum"),
         helper.make_node("Tanh", ["s"], ["hn"], name="cell"),
         helper.make_node("Identity", ["hn"], ["yt"], name="emit")],
        "cell", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 8]),
                 helper.make_tensor_value_info("xt", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("yt", TensorProto.FLOAT, [1, 8])])
    nodes = [helper.make_node("Scan", ["h0", "x"], ["h_last", "ys"], name="rnn", body=body, num_scan_inputs=1,
                              scan_input_axes=[1], scan_output_axes=[0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 4]),
                                           helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("ys", TensorProto.FLOAT, ["T", 1, 8])],
                              [numpy_helper.from_array(rng.normal(0, 0.5, (4, 8)).astype(np.float32), "wx"),
                               numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), "wh")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": rng.normal(0, 1, (1, int(rng.integers(3, 9)), 4)).astype(np.float32),
              "h0": np.zeros((1, 8), np.float32)} for _ in range(30)]
    result = edgequant.quantize(model, feeds, repair=False, specialize=False)
    onnx.checker.check_model(result.model, full_check=True)
    scan = next(n for n in result.model.graph.node if n.op_type == "Scan")
    assert [a.ints for a in scan.attribute if a.name == "scan_output_axes"] == [[0]]
    body_ops = [n.op_type for a in scan.attribute if a.name == "body" for n in a.g.node]
    assert body_ops.count("QuantizeLinear") >= 3 and body_ops.count("MatMul") == 2
    assert result.summary.quantized_ops["MatMul"] == 2
    assert any(n.startswith("Scan rnn: body quantized on 24 of its iterations") for n in result.summary.notes), \
        result.summary.notes
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    qsess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for f in feeds[:5]:
        a, b = sess.run(None, f)[0].ravel(), qsess.run(None, f)[0].ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99  # 8-bit steps compound over the steps
