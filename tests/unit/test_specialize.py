"""Shape specialization and If folding: the folded graph computes what the original computes
at those shapes (onnxruntime on both), and no If is left."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgequant
from edgequant.errors import ConfigError
from edgequant.passes.specialize import Specialize, has_control_flow
from tests.conftest import run


def _branch(name, nodes, outputs, inits=()):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                             list(inits))


def batch_test_model() -> onnx.ModelProto:
    """``if batch == 1: (x·2 if k == 5 else x − 1) else x·3``, with the inner If nested in the
    then-branch, a branch initializer and captured outer values."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    inner_then = _branch("inner_then", [helper.make_node("Mul", ["x", "two"], ["t"], name="double")], ["t"], [two])
    inner_else = _branch("inner_else", [helper.make_node("Sub", ["x", "one"], ["t2"], name="minus")], ["t2"])
    then = _branch("then", [
        helper.make_node("Equal", ["k", "five"], ["is5"], name="k_is_5"),
        helper.make_node("If", ["is5"], ["picked"], name="inner", then_branch=inner_then, else_branch=inner_else),
        helper.make_node("Relu", ["picked"], ["r"], name="relu"),
        helper.make_node("Identity", ["x"], ["xi"], name="keep"),
    ], ["r", "xi"])
    other = _branch("else", [helper.make_node("Mul", ["x", "three"], ["e"], name="triple"),
                             helper.make_node("Identity", ["x"], ["ex"], name="same")], ["e", "ex"])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["b"], name="batch", axis=0),
        helper.make_node("Equal", ["b", "one_i"], ["is1"], name="batch_is_1"),
        helper.make_node("If", ["is1"], ["y", "passthrough"], name="outer", then_branch=then, else_branch=other),
    ]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("one_i", TensorProto.INT64, [], [1]),
             helper.make_tensor("five", TensorProto.INT64, [], [5]), helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
             helper.make_tensor("three", TensorProto.FLOAT, [], [3.0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                           helper.make_tensor_value_info("k", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("passthrough", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("k", [5, 7])
def test_folding_keeps_what_the_model_computes_at_those_shapes(k, rng):
    model = batch_test_model()
    x = rng.standard_normal((1, 4)).astype(np.float32)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    spec = Specialize({"x": (1, 4)}, {"k": np.array(k)})
    assert spec(folded)
    onnx.checker.check_model(folded, full_check=True)
    assert not has_control_flow(folded) and spec.report.folded == 2 and spec.report.left == 0
    feed = {"x": x, "k": np.array(k, np.int64)}
    for a, b in zip(run(model, feed), run(folded, feed)):
        np.testing.assert_array_equal(a, b)
    assert [i.name for i in folded.graph.input] == ["x", "k"]  # the pinned input stays, unused
    dims = [d.dim_value for d in folded.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 4]
    names = [n.name for n in folded.graph.node]
    assert "outer/relu" in names and f"outer/inner/{'double' if k == 5 else 'minus'}" in names  # readable
    assert "fixed" not in spec.report.describe() and "folded 2 If" in spec.report.describe()


def test_only_shapes_leave_the_data_dependent_if_in_place(rng):
    model = batch_test_model()
    spec = Specialize({"x": (1, 4)}, {})
    spec(model)
    assert spec.report.folded == 1 and spec.report.left == 1  # k's test depends on data
    x = rng.standard_normal((1, 4)).astype(np.float32)
    for k in (5, 6):
        ref = run(batch_test_model(), {"x": x, "k": np.array(k, np.int64)})
        np.testing.assert_array_equal(run(model, {"x": x, "k": np.array(k, np.int64)})[0], ref[0])


def test_bad_specializations_are_one_line_errors():
    with pytest.raises(ConfigError, match="not an input of the model"):
        Specialize({"nope": (1, 4)}, {})(batch_test_model())
    with pytest.raises(ConfigError, match="rank 2"):
        Specialize({"x": (1, 4, 1)}, {})(batch_test_model())
    with pytest.raises(ConfigError, match="must read NAME=VALUE"):
        edgequant.make_options(input_shapes=["x:1x4"])
    with pytest.raises(ConfigError, match="not a shape"):
        edgequant.make_options(input_shapes={"x": "1xfour"})
    with pytest.raises(ConfigError, match="not a finite number"):
        edgequant.make_options(fixed_inputs={"k": "nan"})
    assert edgequant.make_options(input_shapes="x=1x4", fixed_inputs=["k=5"]).input_shapes == (("x", (1, 4)),)


def test_quantize_specializes_a_model_with_control_flow_at_its_calibration_shapes(rng):
    model = batch_test_model()
    data = [{"x": rng.standard_normal((1, 4)).astype(np.float32), "k": np.array(5, np.int64)} for _ in range(20)]
    r = edgequant.quantize(model, data)
    assert not has_control_flow(r.model) and r.summary.subgraph_float_ops == 0
    assert any(note.startswith("specialized at x=1x4, k=5: folded 2 If") for note in r.summary.notes), r.summary.notes
    kept = edgequant.quantize(model, data, specialize=False)
    assert has_control_flow(kept.model) and kept.summary.subgraph_float_ops > 0
    mixed = [{**d, "k": np.array(5 + i % 2, np.int64)} for i, d in enumerate(data)]  # k varies: not pinned
    r2 = edgequant.quantize(model, mixed)
    assert has_control_flow(r2.model) and any("folded 1 If" in n for n in r2.summary.notes)


def loop_test_model(early_exit: bool = False) -> onnx.ModelProto:
    """``h = x; for i in range(T): h = tanh(h·W + i); ys.append(h)`` with T = x's second
    dimension (a Shape-derived trip count, as exporters write it); outputs the last h and the
    stacked ys. ``early_exit``: the body's condition is ``sum(h) < 100`` (data decides)."""
    rng = np.random.default_rng(3)
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 4], (rng.standard_normal((4, 4)) * 0.5).astype(np.float32).ravel())
    body_nodes = [
        helper.make_node("MatMul", ["h_in", "W"], ["hw"], name="project"),
        helper.make_node("Cast", ["i"], ["i_f"], name="step_float", to=TensorProto.FLOAT),
        helper.make_node("Add", ["hw", "i_f"], ["pre"], name="add_step"),
        helper.make_node("Tanh", ["pre"], ["h_out"], name="squash"),
        helper.make_node("Identity", ["h_out"], ["y"], name="emit"),
    ]
    if early_exit:
        body_nodes += [helper.make_node("ReduceSum", ["h_out"], ["total"], name="total", keepdims=0),
                       helper.make_node("Less", ["total", "hundred"], ["cond_out"], name="keep_going")]
        cond_out = "cond_out"
    else:
        body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond"))
        cond_out = "cond_out"
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [3, "T"])],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [3, "T"]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "T"])])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "one_i"], ["steps"], name="steps", axis=0),
        helper.make_node("Loop", ["steps", "go", "x"], ["h_last", "ys"], name="recur", body=body),
    ]
    inits = [helper.make_tensor("one_i", TensorProto.INT64, [], [1]), helper.make_tensor("go", TensorProto.BOOL, [], [True]),
             helper.make_tensor("hundred", TensorProto.FLOAT, [], [100.0]), w]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, "T"])],
                              [helper.make_tensor_value_info("h_last", TensorProto.FLOAT, [3, "T"]),
                               helper.make_tensor_value_info("ys", TensorProto.FLOAT, ["steps", 3, "T"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_loop_with_a_constant_trip_count_unrolls_into_what_it_computed(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    model = loop_test_model()
    spec = Specialize({"x": (3, 4)}, {})
    spec(model)
    onnx.checker.check_model(model, full_check=True)
    assert not has_control_flow(model) and spec.report.unrolled == 1 and spec.report.left == 0
    assert "unrolled 1 Loop" in spec.report.describe()
    names = [n.name for n in model.graph.node]
    assert "recur/0/project" in names and "recur/3/squash" in names and "recur/4/project" not in names
    for a, b in zip(run(loop_test_model(), {"x": x}), run(model, {"x": x})):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    stopping = loop_test_model(early_exit=True)  # data decides when it stops: it stays a Loop
    spec = Specialize({"x": (3, 4)}, {})
    spec(stopping)
    assert has_control_flow(stopping) and spec.report.unrolled == 0 and spec.report.left == 1


def test_quantize_unrolls_the_loop_and_quantizes_what_was_inside(rng):
    data = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(20)]
    r = edgequant.quantize(loop_test_model(), data)
    assert not has_control_flow(r.model) and r.summary.subgraph_float_ops == 0
    ops = [n.op_type for n in r.model.graph.node]
    assert ops.count("MatMul") == 4 and ops.count("DequantizeLinear") > 8  # the four copies' MatMuls quantized
