"""Cross-layer equalization, high-bias absorption and SmoothQuant: float outputs unchanged
(onnxruntime, fp32: rtol 1e-4 and atol 1e-4 of the output scale), ranges flatter, and the
cases they must leave alone."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgequant.algorithms.cle import channel_minima, equalization_scales, equalize, pre_activations
from edgequant.algorithms.smoothquant import channel_absmax, smooth, smoothing_scales
from edgequant.errors import ConfigError
from tests.conftest import parse, run


def build(text: str, **inits: np.ndarray) -> onnx.ModelProto:
    m = parse(text, check=False)
    m.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items())
    onnx.checker.check_model(m)
    return m


def ops(model):
    return [n.op_type for n in model.graph.node]


def array(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def close(after, before):
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * float(np.abs(before).max()))


def skewed_conv(rng, out, inp, k=3):
    """A conv weight whose output channels differ in range by up to 10⁴ (as after BN folding)."""
    return rng.standard_normal((out, inp, k, k)) * 10 ** rng.uniform(-2, 2, (out, 1, 1, 1))


def conv_pair(rng, act: str = "h = Relu (y)", extra_out: str = "", slope=None):
    inits = {"W1": skewed_conv(rng, 4, 3), "B1": rng.standard_normal(4), "W2": rng.standard_normal((5, 4, 3, 3)),
             "B2": rng.standard_normal(5)}
    if slope is not None:
        inits["S"] = slope
    return build(f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 8, 8] x) => (float[1, 5, 8, 8] z{extra_out}) {{
        y = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
        {act}
        z = Conv <pads = [1, 1, 1, 1]> (h, W2, B2)
    }}""", **inits)


def test_equalization_scales_formula():
    np.testing.assert_allclose(equalization_scales(np.array([4.0, 1.0, 0.0]), np.array([1.0, 4.0, 3.0])),
                               [2.0, 0.5, 1.0])


def test_cle_conv_relu_conv_keeps_outputs_and_flattens_ranges(rng):
    m = conv_pair(rng)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = run(m, {"x": x})[0]
    report = equalize(m)
    assert len(report.pairs) == 1 and report.converged and report.iterations == 2
    assert report.range_ratio_after < report.range_ratio_before / 10
    close(run(m, {"x": x})[0], before)
    r1 = np.abs(array(m, "W1")).max(axis=(1, 2, 3))
    r2 = np.abs(array(m, "W2")).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # both are sqrt(r1 · r2) now


def test_cle_depthwise_chain_converges(rng):
    inits = {"W1": skewed_conv(rng, 6, 3), "B1": rng.standard_normal(6),
             "WD": skewed_conv(rng, 6, 1), "BD": rng.standard_normal(6),
             "W3": rng.standard_normal((4, 6, 1, 1)), "B3": rng.standard_normal(4)}
    m = build("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] z) {
        y = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
        h = Relu (y)
        d = Conv <group = 6, pads = [1, 1, 1, 1]> (h, WD, BD)
        e = LeakyRelu <alpha = 0.1> (d)
        z = Conv (e, W3, B3)
    }""", **inits)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = run(m, {"x": x})[0]
    report = equalize(m, iterations=500, tolerance=1e-6)
    assert len(report.pairs) == 2 and report.converged and report.iterations > 2
    assert report.range_ratio_after < report.range_ratio_before
    close(run(m, {"x": x})[0], before)
    wd = np.abs(array(m, "WD")).max(axis=(1, 2, 3))  # the DW's channels, as input and output
    np.testing.assert_allclose(np.abs(array(m, "W1")).max(axis=(1, 2, 3)), wd, rtol=1e-3)
    np.testing.assert_allclose(np.abs(array(m, "W3")).max(axis=(0, 2, 3)), wd, rtol=1e-3)


def test_cle_through_prelu_per_channel_and_linear_layers(rng):
    m = conv_pair(rng, act="h = PRelu (y, S)", slope=rng.uniform(0, 0.5, (4, 1, 1)))
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = run(m, {"x": x})[0]
    assert len(equalize(m).pairs) == 1
    close(run(m, {"x": x})[0], before)

    lin = build("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 6] x) => (float[2, 3] z) {
        y0 = MatMul (x, W1)
        y = Add (y0, B1)
        h = PRelu (y, S)
        z = Gemm <transB = 1> (h, W2, B2)
    }""", W1=rng.standard_normal((6, 5)) * 10 ** rng.uniform(-2, 2, 5), B1=rng.standard_normal(5),
        S=rng.uniform(0, 0.5, 5), W2=rng.standard_normal((3, 5)), B2=rng.standard_normal(3))
    x = rng.standard_normal((2, 6)).astype(np.float32)
    before = run(lin, {"x": x})[0]
    report = equalize(lin)
    assert len(report.pairs) == 1 and report.range_ratio_after < report.range_ratio_before
    close(run(lin, {"x": x})[0], before)


def test_cle_conv_whose_bias_is_a_separate_add(rng):
    m = build("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 8, 8] x) => (float[1, 5, 8, 8] z) {
        y0 = Conv <pads = [1, 1, 1, 1]> (x, W1)
        y = Add (y0, B1)
        h = Relu (y)
        z = Conv <pads = [1, 1, 1, 1]> (h, W2, B2)
    }""", W1=skewed_conv(rng, 4, 3), B1=rng.standard_normal((4, 1, 1)), W2=rng.standard_normal((5, 4, 3, 3)),
        B2=rng.standard_normal(5))
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = run(m, {"x": x})[0]
    assert len(equalize(m).pairs) == 1
    close(run(m, {"x": x})[0], before)


def test_cle_leaves_shared_or_output_intermediates_and_spatial_prelu_alone(rng):
    cases = [conv_pair(rng, act="h = Relu (y)", extra_out=", float[1, 4, 8, 8] h"),
             conv_pair(rng, act="h = Relu (y)", extra_out=", float[1, 4, 8, 8] y"),
             conv_pair(rng, act="h = PRelu (y, S)", slope=rng.uniform(0, 0.5, 8))]  # slope varies along W
    for m in cases:
        w1 = array(m, "W1").copy()
        report = equalize(m)
        assert report.pairs == () and not report.changed
        np.testing.assert_array_equal(array(m, "W1"), w1)


def relu6_pair(rng):
    return build("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 8, 8] x) => (float[1, 5, 8, 8] z) {
        y = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
        h = Clip (y, lo, hi)
        z = Conv <pads = [1, 1, 1, 1]> (h, W2, B2)
    }""", W1=skewed_conv(rng, 4, 3) * 1e-3, B1=np.zeros(4), W2=rng.standard_normal((5, 4, 3, 3)),
        B2=np.zeros(5), lo=np.array(0.0), hi=np.array(6.0))


def test_relu6_replaced_by_relu_only_when_asked(rng):
    kept = relu6_pair(rng)
    report = equalize(kept, relu6="skip")
    assert report.pairs == () and ops(kept) == ["Conv", "Clip", "Conv"]

    m = relu6_pair(rng)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = run(m, {"x": x})[0]
    report = equalize(m, relu6="relu")
    assert ops(m) == ["Conv", "Relu", "Conv"] and report.activations_replaced == ("h",)
    close(run(m, {"x": x})[0], before)  # the clip never bound on these inputs
    with pytest.raises(ConfigError, match="cle_relu6"):
        equalize(relu6_pair(rng), relu6="yes")


def test_relu6_bounded_per_channel_is_exact_where_the_clip_binds(rng):
    w1, b1 = skewed_conv(rng, 4, 3), rng.standard_normal(4)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[4, 3, 8, 8] x) => (float[4, 5, 8, 8] z) {
        y = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
        h = Clip (y, lo, hi)
        z = Conv <pads = [1, 1, 1, 1]> (h, W2, B2)
    }"""
    m = build(text, W1=w1, B1=b1, W2=rng.standard_normal((5, 4, 3, 3)), B2=np.zeros(5), lo=np.array(0.0),
              hi=np.array(6.0))
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    before = run(m, {"x": x})[0]
    conv_only = build("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[4, 3, 8, 8] x) => (float[4, 4, 8, 8] y) {
        y = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    }""", W1=w1, B1=b1)
    assert (run(conv_only, {"x": x})[0] > 6).mean() > 0.1  # the clip binds on a good share of the values
    report = equalize(m)  # relu6="bound" by default
    assert ops(m) == ["Conv", "Relu", "Min", "Conv"] and report.activations_bounded == ("h",)
    assert report.range_ratio_after < report.range_ratio_before and report.activations_replaced == ()
    bound = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("_bound"))
    assert bound.shape == (4, 1, 1) and not np.allclose(bound, 6.0)
    onnx.checker.check_model(m)
    close(run(m, {"x": x})[0], before)


def high_bias_pair(rng, pads: str):
    return build(f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 8, 8] x) => (float z) {{
        y = Conv (x, W1, B1)
        h = Relu (y)
        z = Conv <pads = {pads}> (h, W2, B2)
    }}""", W1=rng.standard_normal((4, 3, 1, 1)) * 0.1, B1=np.array([5.0, 3.0, -1.0, 8.0]),
        W2=rng.standard_normal((2, 4, 3, 3)), B2=np.zeros(2))


def test_high_bias_absorption_keeps_outputs_on_data_within_the_bound(rng):
    m = high_bias_pair(rng, "[0, 0, 0, 0]")
    samples = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    before = [run(m, s)[0] for s in samples]
    tensors = pre_activations(m)
    assert tensors == ["y"]
    minima = channel_minima(m, tensors, samples)
    assert minima["y"].shape == (4,) and minima["y"][0] > 4
    b1 = array(m, "B1").copy()
    report = equalize(m, absorb_bias=True, minima=minima)
    assert report.biases_absorbed == 1
    assert np.all(np.abs(array(m, "B1"))[[0, 1, 3]] < np.abs(b1 / 1)[[0, 1, 3]] * 0.5)
    for s, want in zip(samples, before):
        close(run(m, s)[0], want)

    padded = high_bias_pair(rng, "[1, 1, 1, 1]")  # zero padding would make the shift wrong
    minima = channel_minima(padded, ["y"], samples)
    assert equalize(padded, absorb_bias=True, minima=minima).biases_absorbed == 0


def ln_model(rng):
    return build("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 5, 8] x) => (float[2, 5, 6] y, float[2, 5, 3] q, int64[3] r) {
        n = LayerNormalization <axis = -1> (x, G, B)
        y = MatMul (n, W1)
        q = MatMul (n, W2)
        r = Shape (n)
    }""", G=rng.uniform(0.5, 2, 8), B=rng.standard_normal(8), W1=rng.standard_normal((8, 6)),
        W2=rng.standard_normal((8, 3)))


def outlier_samples(rng, shape, name="x", count=3):
    boost = np.ones(shape[-1])
    boost[[1, 5]] = 50.0  # outlier channels
    return [{name: (rng.standard_normal(shape) * boost).astype(np.float32)} for _ in range(count)]


def flatness(v):
    return float(v.max() / v.min())


def test_smoothing_scales_formula():
    np.testing.assert_allclose(smoothing_scales(np.array([100.0, 1.0, 0.0]), np.array([1.0, 1.0, 2.0]), 0.5),
                               [10.0, 1.0, 1.0])


def test_smooth_folds_into_layernorm_shared_by_two_matmuls(rng):
    m = ln_model(rng)
    gamma = np.ones(8)
    gamma[[1, 5]] = 50.0  # LN's scale makes the outliers
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(gamma.astype(np.float32), "G"))
    samples = outlier_samples(rng, (2, 5, 8))
    before = [run(m, s) for s in samples]
    absmax = channel_absmax(m, ["n"], samples)
    report = smooth(m, absmax, alpha=0.5)
    assert report.folded == (("n", "LayerNormalization"),) and report.inserted == ()
    assert ops(m) == ["LayerNormalization", "MatMul", "MatMul", "Shape"] and len(report.layers) == 2
    for s, want in zip(samples, before):
        for got, ref in zip(run(m, s), want):
            close(got, ref)
    after = channel_absmax(m, ["n"], samples)["n"]
    assert flatness(after) < flatness(absmax["n"]) / 3
    assert report.flatness_after < report.flatness_before


def test_smooth_inserts_mul_when_the_activation_has_another_reader(rng):
    m = build("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 5, 8] x) => (float[2, 5, 6] y, float[2, 5, 8] r) {
        y = MatMul (x, W1)
        r = Add (x, x)
    }""", W1=rng.standard_normal((8, 6)))
    samples = outlier_samples(rng, (2, 5, 8))
    before = [run(m, s) for s in samples]
    absmax = channel_absmax(m, ["x"], samples)
    report = smooth(m, absmax)
    assert report.folded == () and report.inserted == ("x_smooth",)
    assert ops(m) == ["Mul", "MatMul", "Add"] and list(m.graph.node[2].input) == ["x", "x"]
    for s, want in zip(samples, before):
        for got, ref in zip(run(m, s), want):
            close(got, ref)
    smoothed = channel_absmax(m, ["x_smoothed"], samples)["x_smoothed"]
    assert flatness(smoothed) < flatness(absmax["x"]) / 3


def test_smooth_folds_into_decomposed_layernorm_mul_add(rng):
    m = build("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4, 8] x) => (float[4, 3] y) {
        m = Mul (x, G)
        n = Add (m, B)
        y = Gemm <transB = 1> (n, W, C)
    }""", G=rng.uniform(0.5, 2, 8), B=rng.standard_normal(8), W=rng.standard_normal((3, 8)),
        C=rng.standard_normal(3))
    samples = outlier_samples(rng, (4, 8))
    before = [run(m, s)[0] for s in samples]
    report = smooth(m, channel_absmax(m, ["n"], samples), alpha=0.7)
    assert report.folded == (("n", "Mul+Add"),) and ops(m) == ["Mul", "Add", "Gemm"]
    for s, want in zip(samples, before):
        close(run(m, s)[0], want)


def test_smoothquant_auto_picks_per_activation_the_alpha_with_the_least_product_error(rng):
    """Per activation, the chosen α has the least error of the quantized product among the grid
    and no smoothing: for x (outlier channels) smoothing beats leaving it; for z (flat, but read
    by a weight with one huge row) α moves that row's range into the activation. A tensor mapped
    to None is left as it is; the float outputs stay equal."""
    from edgequant.algorithms.smoothquant import (
        AlphaSearch,
        _product_error,
        _row_ranges,
        _Smoother,
        activation_rows,
        choose_alphas,
    )

    w_flat = rng.standard_normal((8, 6))
    w_uneven = rng.standard_normal((8, 6)) * np.array([1, 1, 1, 40, 1, 1, 1, 1])[:, None]
    m = build("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 5, 8] x, float[2, 5, 8] z) => (float[2, 5, 6] y, float[2, 5, 6] v) {
        y = MatMul (x, W1)
        v = MatMul (z, W2)
    }""", W1=w_flat, W2=w_uneven)
    samples = [{**a, "z": rng.standard_normal((2, 5, 8)).astype(np.float32)} for a in outlier_samples(rng, (2, 5, 8))]
    before = [run(m, s) for s in samples]
    absmax = channel_absmax(m, ["x", "z"], samples)
    rows = activation_rows(m, ["x", "z"], samples)
    assert rows["x"].shape == (30, 8)
    alphas = choose_alphas(m, rows, absmax)
    sm = _Smoother(m)
    for name, w in (("x", w_flat), ("z", w_uneven)):
        mats, x = [w.astype(np.float32)], rows[name]
        refs = [(x @ mats[0], 1)]
        ranges = _row_ranges(sm.inits, sm.layers_of(name, 8))
        err = {a: _product_error(x, mats, refs, smoothing_scales(absmax[name], ranges, a).astype(np.float32),
                                 AlphaSearch()) for a in AlphaSearch().grid}
        none = _product_error(x, mats, refs, np.ones(8, np.float32), AlphaSearch())
        assert alphas[name] is not None and err[alphas[name]] == min(err.values()) and err[alphas[name]] < none
    report = smooth(m, absmax, {"x": alphas["x"], "z": None})
    assert report.activations == ("x",)  # z left as it is
    for s, want in zip(samples, before):
        for got, ref in zip(run(m, s), want):
            close(got, ref)


def _per_tensor_product_error(x, w, s):
    """The oracle: ``Q(x/s)·Q(s·W)`` against ``x·W``, relative, written out here: uint8 asymmetric
    activation over [min, max] ∪ 0, int8 symmetric weight over max |s·W| (one scale each)."""
    xs = x / s
    lo, hi = min(xs.min(), 0.0), max(xs.max(), 0.0)
    step = (hi - lo) / 255
    zp = np.round(-lo / step)
    xq = (np.clip(np.round(xs / step) + zp, 0, 255) - zp) * step
    ws = w * s[:, None]
    wstep = np.abs(ws).max() / 127
    wq = np.clip(np.round(ws / wstep), -128, 127) * wstep
    ref = x @ w
    return float(np.mean((xq @ wq - ref) ** 2) / np.mean(ref ** 2))


def test_smoothquant_auto_judges_per_tensor_weights_per_tensor():
    """Where the plan quantizes a MatMul's weight per tensor (``per_channel=False``, or TPU-MLIR's
    and Acuity's per-tensor MatMul/Gemm), the α search quantizes its trial weights per tensor: its
    choice is the best α of the grid by an independent per-tensor oracle, where the per-channel
    search's choice has twice that error (a weight with one dominant output column and row)."""
    from edgequant.algorithms.smoothquant import AlphaSearch, activation_rows, choose_alphas

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)) * np.array([1, 1, 1, 1, 1, 30])[None, :] * np.array([1] * 7 + [8])[:, None]
    m = build("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 5, 8] x) => (float[2, 5, 6] y) {
        y = MatMul (x, W1)
    }""", W1=w)
    samples = outlier_samples(rng, (2, 5, 8))
    absmax = channel_absmax(m, ["x"], samples)
    rows = activation_rows(m, ["x"], samples)
    per_tensor = choose_alphas(m, rows, absmax, AlphaSearch(per_channel=False))["x"]
    per_channel = choose_alphas(m, rows, absmax)["x"]
    assert choose_alphas(m, rows, absmax, AlphaSearch(per_channel_ops=("Conv",)))["x"] == per_tensor
    x, w_max = rows["x"].astype(np.float64), np.abs(w).max(axis=1)
    err = {a: _per_tensor_product_error(x, w, smoothing_scales(absmax["x"], w_max, a)) for a in AlphaSearch().grid}
    err[None] = _per_tensor_product_error(x, w, np.ones(8))
    assert err[per_tensor] == pytest.approx(min(err.values()), rel=1e-6)
    assert err[per_channel] > 1.5 * err[per_tensor]
