"""Each preparation pass: numerically equal to the original, and a case it must not touch."""

import numpy as np
import onnx
from onnx import numpy_helper

from edgequant.passes import (
    ConstantsToInitializers,
    FoldBatchNorm,
    FoldConstants,
    InferShapes,
    RemoveIdentity,
)
from edgequant.passes.pipeline import prepare_model
from tests.conftest import parse, run


def ops(model):
    return [n.op_type for n in model.graph.node]


def conv_bn(consumers_of_y: str = "") -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] z{', float[1, 4, 8, 8] y' if consumers_of_y else ''}) {{
        y = Conv <pads = [1, 1, 1, 1]> (x, W, B)
        z = BatchNormalization (y, gamma, beta, mean, var)
    }}
    """
    m = parse(text, check=False)
    inits = {
        "W": rng.standard_normal((4, 3, 3, 3)), "B": rng.standard_normal(4),
        "gamma": rng.uniform(0.5, 2, 4), "beta": rng.standard_normal(4),
        "mean": rng.standard_normal(4), "var": rng.uniform(0.5, 2, 4),
    }
    m.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items())
    return m


def test_fold_batchnorm_into_conv_is_exact(rng):
    m = conv_bn()
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = run(m, {"x": x})[0]
    assert FoldBatchNorm()(m) is True
    assert ops(m) == ["Conv"]
    np.testing.assert_allclose(run(m, {"x": x})[0], before, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_skips_when_conv_output_is_also_used():
    m = conv_bn(consumers_of_y="y")
    assert FoldBatchNorm()(m) is False
    assert ops(m) == ["Conv", "BatchNormalization"]


def test_fold_batchnorm_into_gemm_and_convtranspose(rng):
    for op, wshape, attrs in (("Gemm", (5, 4), "<transB = 1>"), ("ConvTranspose", (3, 4, 3, 3), "")):
        x_shape = "[2, 4]" if op == "Gemm" else "[1, 3, 5, 5]"
        m = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float{x_shape} x) => (float z) {{
            y = {op} {attrs} (x, W, B)
            z = BatchNormalization (y, gamma, beta, mean, var)
        }}""")
        c = wshape[0] if op == "Gemm" else wshape[1]
        for k, v in {"W": rng.standard_normal(wshape), "B": rng.standard_normal(c), "gamma": rng.uniform(0.5, 2, c),
                     "beta": rng.standard_normal(c), "mean": rng.standard_normal(c), "var": rng.uniform(0.5, 2, c)}.items():
            m.graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), k))
        x = rng.standard_normal((2, 4) if op == "Gemm" else (1, 3, 5, 5)).astype(np.float32)
        before = run(m, {"x": x})[0]
        assert FoldBatchNorm()(m) is True, op
        np.testing.assert_allclose(run(m, {"x": x})[0], before, rtol=1e-4, atol=1e-4)


def test_constants_become_initializers(rng):
    m = parse("""
    <ir_version: 7, opset_import: ["" : 12]>
    g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y) {
        W = Constant <value = float[2, 2, 1, 1] {1, 2, 3, 4}> ()
        y = Conv (x, W)
    }""")
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    before = run(m, {"x": x})[0]
    assert ConstantsToInitializers()(m) is True
    assert ops(m) == ["Conv"] and [t.name for t in m.graph.initializer] == ["W"]
    np.testing.assert_allclose(run(m, {"x": x})[0], before)
    assert ConstantsToInitializers()(m) is False


def test_constant_that_is_a_graph_output_stays():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2] x) => (float[2] c) {
        c = Constant <value = float[2] {1, 2}> ()
    }""")
    assert ConstantsToInitializers()(m) is False


def test_fold_constants_evaluates_constant_subgraphs(rng):
    m = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[3, 4] x, float[4, 2] w) => (float[3, 2] y) {
        wt = Transpose <perm = [1, 0]> (w0)
        y = MatMul (x, wt)
    }""".replace("float[4, 2] w)", ")").replace("(float[3, 4] x, ", "(float[3, 4] x"), check=False)
    m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "w0"))
    x = rng.standard_normal((3, 4)).astype(np.float32)
    before = run(m, {"x": x})[0]
    InferShapes()(m)
    assert FoldConstants()(m) is True
    assert ops(m) == ["MatMul"] and {t.name for t in m.graph.initializer} == {"wt"}
    np.testing.assert_allclose(run(m, {"x": x})[0], before, rtol=1e-6)


def test_fold_constants_folds_static_shape_but_not_dynamic():
    static = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 3] x) => (float[3, 2] y) {
        s = Shape (x)
        r = Slice (s, starts, ends)
        y = Reshape (x, shp)
    }""".replace("r = Slice (s, starts, ends)\n", "a = Slice (s, st0, en0)\n b = Slice (s, st1, en1)\n shp = Concat <axis = 0> (b, a)\n"), check=False)
    for k, v in {"st0": [0], "en0": [1], "st1": [1], "en1": [2]}.items():
        static.graph.initializer.append(numpy_helper.from_array(np.array(v, np.int64), k))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    before = run(static, {"x": x})[0]
    InferShapes()(static)
    assert FoldConstants()(static) is True
    assert ops(static) == ["Reshape"]
    np.testing.assert_array_equal(run(static, {"x": x})[0], before)
    dynamic = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3] x) => (int64[2] s) {
        s = Shape (x)
    }""")
    InferShapes()(dynamic)
    assert FoldConstants()(dynamic) is False


def test_remove_identity_and_dropout(rng):
    m = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 3] x) => (float[2, 3] z) {
        a = Identity (x)
        b = Relu (a)
        c = Dropout (b)
        z = Identity (c)
    }""")
    x = rng.standard_normal((2, 3)).astype(np.float32)
    before = run(m, {"x": x})[0]
    assert RemoveIdentity()(m) is True
    assert ops(m) == ["Relu"] and m.graph.node[0].output[0] == "z"
    np.testing.assert_array_equal(run(m, {"x": x})[0], before)


def test_remove_identity_keeps_input_to_output_identity_and_dropout_mask():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2] x) => (float[2] y, float[2] o, bool[2] mask) {
        y = Identity (x)
        o, mask = Dropout (x)
    }""")
    assert RemoveIdentity()(m) is False


IF_CAPTURE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 3] x, bool c) => (float[2, 3] z) {
    a = Identity (x)
    r = Relu (a)
    z = If (c) <
        then_branch = t () => (float[2, 3] out_t) { out_t = Add (r, a) },
        else_branch = e () => (float[2, 3] out_e) {
            k = Neg (a)
            out_e = If (c) <
                then_branch = t2 () => (float[2, 3] o2) { o2 = Mul (k, a) },
                else_branch = e2 () => (float[2, 3] o3) { o3 = Identity (r) }
            >
        }
    >
}"""


def test_remove_identity_follows_captures_into_if_bodies(rng):
    """An If body (two levels deep) reading the removed Identity's output reads its input."""
    m = parse(IF_CAPTURE)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    before = [run(m, {"x": x, "c": np.array(c)})[0] for c in (True, False)]
    assert RemoveIdentity()(m) is True
    assert ops(m) == ["Relu", "If"]
    onnx.checker.check_model(m, full_check=True)
    after = [run(m, {"x": x, "c": np.array(c)})[0] for c in (True, False)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    body_ids = [n.op_type for n in m.graph.node[1].attribute[1].g.node[1].attribute[1].g.node]
    assert body_ids == ["Identity"]  # an Identity inside a body passes a value through: it stays


def test_pre_ir4_models_get_initializers_out_of_their_inputs(rng):
    from edgequant.passes import RaiseIRVersion

    W = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8]),
         onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [4, 3, 3, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], initializer=[W])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 7)])
    m.ir_version = 3
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = run(m, {"x": x})[0]
    assert RaiseIRVersion()(m) is True and RaiseIRVersion()(m) is False
    assert m.ir_version == 4 and [i.name for i in m.graph.input] == ["x"]
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "added_later"))
    onnx.checker.check_model(m, full_check=True)  # IR 3 would want "added_later" among the inputs
    np.testing.assert_array_equal(run(m, {"x": x})[0], before)


def test_infer_shapes_fills_value_info():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 3] x) => (float[3, 2] y) {
        t = Relu (x)
        y = Transpose <perm = [1, 0]> (t)
    }""")
    assert InferShapes()(m) is True
    assert {v.name for v in m.graph.value_info} == {"t"}


def test_prepare_pipeline_reports_each_pass(rng):
    m = conv_bn()
    results = prepare_model(m)
    assert [r.name for r in results][:3] == ["raise-ir-version", "constants-to-initializers", "remove-identity"]
    assert any(r.name == "fold-batchnorm" and r.changed for r in results)
    assert not any(r.name == "fold-batchnorm" for r in prepare_model(conv_bn(), simplify=False))


def test_stale_exporter_shapes_do_not_freeze_dynamic_dims():
    """value_info from a traced example (T = 10) must not fold Shape of a dynamic input."""
    m = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, T, 4] x) => (float[1, 4, T] y) {
        s = Shape (x)
        t = Gather <axis = 0> (s, one)
        t1 = Unsqueeze (t, zero)
        shp = Concat <axis = 0> (c1, c4, t1)
        y = Reshape (x, shp)
    }""", check=False)
    for name, v in {"one": np.array(1, np.int64), "zero": np.array([0], np.int64),
                    "c1": np.array([1], np.int64), "c4": np.array([4], np.int64)}.items():
        m.graph.initializer.append(numpy_helper.from_array(v, name))
    m.graph.value_info.append(onnx.helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [3]))
    m.graph.value_info.append(onnx.helper.make_tensor_value_info("t1", onnx.TensorProto.INT64, [1]))
    m.graph.value_info.append(onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 10, 4]))
    prepare_model(m)
    x = np.zeros((1, 7, 4), np.float32)
    assert run(m, {"x": x})[0].shape == (1, 4, 7)


def test_divide_by_a_constant_becomes_a_multiply_by_its_reciprocal(rng):
    from edgequant.passes.constants import DivideByConstantToMul

    m = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 4] x) => (float[2, 4] y, float[2, 4] z) {
        y = Div (x, C)
        z = Div (x, Z)
    }
    """, check=False)
    m.graph.initializer.extend([numpy_helper.from_array(np.array([6.0, 3.0, -0.5, 7.0], np.float32), "C"),
                                numpy_helper.from_array(np.array([1.0, 0.0, 2.0, 4.0], np.float32), "Z")])
    x = rng.standard_normal((2, 4)).astype(np.float32)
    ref = run(m, {"x": x})
    assert DivideByConstantToMul()(m)
    assert [n.op_type for n in m.graph.node] == ["Mul", "Div"]  # a divisor with a zero stays a Div
    got = run(m, {"x": x})
    np.testing.assert_allclose(got[0], ref[0], rtol=2e-7)
    np.testing.assert_array_equal(got[1], ref[1])
    assert not DivideByConstantToMul()(m)



PADDED = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 7, 8] y, float[1, 4, 8, 8] z, float[1, 3, 9, 9] w, float[1, 4, 8, 8] v) {
    p = Pad (x, P)
    y = Conv <pads = [0, 1, 0, 0]> (p, W)
    q = Pad (x, S, one)
    z = Conv (q, W)
    n = Pad (x, P)
    w = Relu (n)
    c = Pad (x, C)
    v = Conv (c, W4)
}
"""


def test_fold_zero_pad_into_the_convolutions_that_read_it(rng):
    """Folded: a zero Pad of H and W read by a Conv only. Kept: a Pad read by a Relu, a pad by
    ones, a pad of the channels."""
    from edgequant.passes.pad import FoldPadIntoConv

    m = parse(PADDED, check=False)
    m.graph.initializer.extend([
        numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64), "P"),  # H begin 1, W end 1
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "S"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([0, 1, 1, 1, 0, 0, 1, 1], np.int64), "C"),
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W4")])
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = run(m, {"x": x})
    assert FoldPadIntoConv()(m)
    assert ops(m) == ["Conv", "Pad", "Conv", "Pad", "Relu", "Pad", "Conv"]
    conv = m.graph.node[0]
    assert conv.input[0] == "x" and [list(a.ints) for a in conv.attribute if a.name == "pads"] == [[1, 1, 0, 1]]
    for got, want in zip(run(m, {"x": x}), ref):
        np.testing.assert_array_equal(got, want)
    assert not FoldPadIntoConv()(m)
