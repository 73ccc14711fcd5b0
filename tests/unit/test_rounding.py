"""Rounding algorithms (GPTQ, AdaRound) and the layer view they share, against oracles:
onnxruntime for the layer maths, nearest rounding (``quantize_array``) for the defining property
(lower error on held-out inputs of the same layer), closed-form cases for GPTQ."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgequant.algorithms.gptq import (
    GPTQOptions,
    cross_gram,
    float_target_weight,
    gptq_round,
    hessian,
)
from edgequant.algorithms.layer import Layer
from edgequant.errors import ConfigError, NotYetSupportedError
from edgequant.planning.ops import weight_axis
from edgequant.quant.assign import weight_params
from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import (
    QuantParams,
    Scheme,
    compute_params,
    dequantize_array,
    quantize_array,
)


def ort_forward(op: str, w: np.ndarray, x: np.ndarray, attrs: dict) -> np.ndarray:
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


LAYER_CASES = {
    "grouped-strided-padded-dilated": ("Conv", (8, 2, 3, 3), (2, 4, 9, 7),
                                       dict(group=2, strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2])),
    "depthwise": ("Conv", (6, 1, 3, 3), (2, 6, 8, 8), dict(group=6, pads=[1, 1, 1, 1])),
    "conv1d": ("Conv", (6, 3, 3), (2, 3, 11), dict(strides=[2], dilations=[2], pads=[1, 2])),
    "conv3d": ("Conv", (4, 2, 2, 3, 2), (1, 2, 5, 6, 4), dict(pads=[1, 0, 0, 0, 1, 1])),
    "gemm": ("Gemm", (5, 7), (3, 5), dict(alpha=0.5)),
    "gemm-transB": ("Gemm", (7, 5), (3, 5), dict(transB=1)),
    "matmul": ("MatMul", (5, 7), (2, 3, 5), {}),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_forward_and_patches_match_onnxruntime(case):
    op, wshape, xshape, attrs = LAYER_CASES[case]
    rng = np.random.default_rng(0)
    w = rng.standard_normal(wshape).astype(np.float32)
    x = rng.standard_normal(xshape).astype(np.float32)
    layer = Layer(op, w, attrs)
    ref = ort_forward(op, w, x, attrs)
    np.testing.assert_allclose(layer.forward(x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.from_matrix(layer.matrix()), w)
    p = layer.patches(x)
    assert p.shape == (layer.groups, layer.row_count(x), layer.matrix().shape[2])
    np.testing.assert_allclose(layer.output_rows(ref), p @ layer.matrix().transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    rows = np.sort(rng.choice(layer.row_count(x), min(5, layer.row_count(x)), replace=False))
    np.testing.assert_array_equal(layer.patch_rows(x, rows), p[:, rows])
    np.testing.assert_array_equal(layer.output_rows(ref, rows), layer.output_rows(ref)[:, rows])
    np.testing.assert_array_equal(np.concatenate(list(layer.iter_patches(x, 40)), axis=1), p)


def test_out_channel_layout_and_row_params():
    conv = Layer("Conv", np.zeros((4, 1, 3, 3), np.float32), {"group": 2})
    np.testing.assert_array_equal(conv.out_channel(0), [[0, 1], [2, 3]])
    gemm = Layer("Gemm", np.zeros((5, 3), np.float32))  # transB=0: [K, N], channels on axis 1
    assert weight_axis("Gemm", 2, {}) == 1
    np.testing.assert_array_equal(gemm.out_channel(1), [[0, 1, 2]])
    assert gemm.out_channel(None) is None
    with pytest.raises(NotYetSupportedError, match="output-channel axis 1"):
        gemm.out_channel(0)
    p = QuantParams(np.array([1, 2, 3, 4], np.float32), np.zeros(4, np.int8), QuantDType.INT8, 0)
    s, z = conv.row_params(p)
    assert s.shape == (2, 2, 1) and s[1, 0, 0] == 3
    s, _ = gemm.row_params(QuantParams(np.array(0.5, np.float32), np.array(0, np.int8), QuantDType.INT8))
    assert s.shape == () and s == 0.5


@pytest.mark.parametrize("op,attrs,match", [
    ("Relu", {}, "supported ops"),
    ("Gemm", {"transA": 1}, "transA"),
    ("Conv", {"auto_pad": "SAME_UPPER"}, "auto_pad"),
])
def test_unsupported_layers_are_named(op, attrs, match):
    w = np.zeros((2, 2, 1, 1) if op == "Conv" else (2, 2), np.float32)
    with pytest.raises(ConfigError, match=match):
        Layer(op, w, attrs)


# -- GPTQ closed-form cases ------------------------------------------------------------------
def int8_unit_scale() -> QuantParams:
    return QuantParams(np.array(1.0, np.float32), np.array(0, np.int8), QuantDType.INT8)


def test_gptq_worked_example_moves_error_to_correlated_input():
    layer = Layer("MatMul", np.array([[0.4], [0.4]], np.float32))
    x = np.array([[1, 1], [2, 2]], np.float32)  # x1 = x2
    q = gptq_round(layer, int8_unit_scale(), Scheme(), x, GPTQOptions(sort_hessian=False))
    np.testing.assert_array_equal(q.ravel(), [0, 1])  # nearest: [0, 0], error 0.8·x → 0.2·x
    np.testing.assert_allclose(hessian(Layer("MatMul", np.zeros((2, 1), np.float32)), x[:1]),
                               [[[2, 2], [2, 2]]])


@pytest.mark.parametrize("scheme", [Scheme(), Scheme(rounding="half_up")])
def test_gptq_equals_nearest_when_inputs_are_orthogonal(scheme):
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.standard_normal((64, 16)))[0] * np.linspace(1, 4, 16)  # H diagonal
    w = rng.standard_normal((16, 24)).astype(np.float32)
    w[15, :4] = np.array([0.5, 1.5, -0.5, 2.5]) / 16  # ties, on the input GPTQ takes first
    layer = Layer("Gemm", w)
    params = compute_params(-8.0, 8.0, QuantDType.UINT8, symmetric=False)  # zero point 128
    params = QuantParams(np.array(1 / 16, np.float32), params.zero_point, QuantDType.UINT8)
    q = gptq_round(layer, params, scheme, basis.astype(np.float32))
    np.testing.assert_array_equal(q, quantize_array(w, params, scheme))


def test_gptq_dead_input_rounds_to_nearest():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 6)).astype(np.float32) @ rng.standard_normal((6, 6)).astype(np.float32)
    x[:, 2] = 0.0
    w = rng.standard_normal((6, 5)).astype(np.float32)
    _, params = weight_params(w, QuantDType.INT4, True, 1, Scheme())
    q = gptq_round(Layer("MatMul", w), params, Scheme(), x)
    np.testing.assert_array_equal(q[2], quantize_array(w, params)[2])


# -- the defining property on random layers with correlated inputs ---------------------------
def correlated_conv_inputs(n: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, 16, 14, 14)).astype(np.float32)
    z = (z[:, :, :-2, :-2] + z[:, :, 1:-1, 1:-1] + z[:, :, 2:, 2:] + z[:, :, 1:-1, :-2]) / 2
    mix = np.random.default_rng(99).standard_normal((16, 16)).astype(np.float32) / 4 + np.eye(16, dtype=np.float32)
    return np.einsum("dc,nchw->ndhw", mix, z)


def correlated_gemm_inputs(n: int, seed: int) -> np.ndarray:
    mix = np.random.default_rng(98).standard_normal((64, 64)) * np.exp(-np.arange(64) / 10)
    return (np.random.default_rng(seed).standard_normal((n, 64)) @ mix).astype(np.float32)


def make_layer(kind: str) -> tuple[Layer, np.ndarray, np.ndarray]:
    """A layer, its calibration inputs and held-out inputs."""
    rng = np.random.default_rng(0)
    if kind == "conv":
        w = rng.standard_normal((32, 16, 3, 3)) / 12
        layer = Layer("Conv", w.astype(np.float32), {"pads": [1, 1, 1, 1]})
    elif kind == "depthwise":
        w = rng.standard_normal((16, 1, 3, 3)) / 3
        layer = Layer("Conv", w.astype(np.float32), {"pads": [1, 1, 1, 1], "group": 16})
    else:
        layer = Layer("Gemm", (rng.standard_normal((48, 64)) / 8).astype(np.float32), {"transB": 1})
        return layer, correlated_gemm_inputs(2048, 1), correlated_gemm_inputs(1024, 2)
    return layer, correlated_conv_inputs(64, 1), correlated_conv_inputs(32, 2)


QUANT_CASES = {  # dtype, symmetric, per-channel, scheme
    "int4-per-channel": (QuantDType.INT4, True, True, Scheme()),
    "int8-per-tensor-narrow-half-up": (QuantDType.INT8, True, False, Scheme(narrow_range=True, rounding="half_up")),
}


def setup_case(kind: str, quant: str):
    layer, x, held_out = make_layer(kind)
    dtype, symmetric, per_channel, scheme = QUANT_CASES[quant]
    axis = weight_axis(layer.op_type, layer.weight.ndim, layer.attrs) if per_channel else None
    nearest, params = weight_params(layer.weight, dtype, symmetric, axis, scheme)
    return layer, x, held_out, params, scheme, nearest


def held_out_error(layer: Layer, q: np.ndarray, params: QuantParams, x: np.ndarray) -> float:
    return float(np.mean((layer.forward(x, dequantize_array(q, params)) - layer.forward(x)) ** 2))


def check_rounding(layer, params, scheme, held_out, nearest, q, q_again, snapshot):
    assert q.shape == nearest.shape and q.dtype == nearest.dtype
    qmin = -params.dtype.qmax if scheme.narrow_range else params.dtype.qmin
    assert q.min() >= qmin and q.max() <= params.dtype.qmax
    assert q.tobytes() == q_again.tobytes()
    np.testing.assert_array_equal(params.scale, snapshot[0])
    np.testing.assert_array_equal(params.zero_point, snapshot[1])
    assert held_out_error(layer, q, params, held_out) < held_out_error(layer, nearest, params, held_out)


@pytest.mark.parametrize("quant", QUANT_CASES)
@pytest.mark.parametrize("kind", ["conv", "depthwise", "gemm"])
@pytest.mark.parametrize("fast", [False, True])
def test_gptq_beats_nearest_on_held_out_inputs(kind, quant, fast):
    layer, x, held_out, params, scheme, nearest = setup_case(kind, quant)
    snapshot = (params.scale.copy(), params.zero_point.copy())
    options = GPTQOptions(fast=fast, block_size=32, fast_rows=2048)
    q = gptq_round(layer, params, scheme, x, options)
    check_rounding(layer, params, scheme, held_out, nearest, q, gptq_round(layer, params, scheme, x, options),
                   snapshot)


def test_float_target_weight_worked_example_undoes_an_upstream_gain():
    x_f = np.random.default_rng(5).standard_normal((512, 64)).astype(np.float32)
    layer = Layer("Gemm", (np.random.default_rng(1).standard_normal((8, 64)) / 8).astype(np.float32), {"transB": 1})
    h, c = hessian(layer, 2 * x_f), cross_gram(layer, 2 * x_f, x_f)
    np.testing.assert_allclose(c, h / 2, rtol=1e-9)
    w_star = float_target_weight(layer.matrix().astype(np.float64), h, c, 1e-9)
    np.testing.assert_allclose(w_star, layer.matrix() / 2, atol=1e-5)


def skewed(x: np.ndarray, seed: int) -> np.ndarray:
    """What an upstream quantized layer might feed: a per-channel gain error and a shift, plus
    rounding noise, on the float inputs."""
    rng = np.random.default_rng(seed)
    axis_shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    gain = (1 + 0.08 * np.random.default_rng(77).standard_normal(axis_shape)).astype(np.float32)
    shift = (0.05 * np.random.default_rng(78).standard_normal(axis_shape)).astype(np.float32)
    return (x * gain + shift + 0.02 * rng.standard_normal(x.shape)).astype(np.float32)


@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_gptq_float_target_beats_plain_gptq_against_the_float_output(kind):
    layer, x_f, held_f, params, scheme, nearest = setup_case(kind, "int4-per-channel")
    x_q, held_q = skewed(x_f, 1), skewed(held_f, 2)
    options = GPTQOptions(block_size=32)
    plain = gptq_round(layer, params, scheme, x_q, options)
    aimed = gptq_round(layer, params, scheme, x_q, options, x_float=x_f)
    assert aimed.dtype == plain.dtype and aimed.shape == plain.shape
    assert aimed.tobytes() == gptq_round(layer, params, scheme, x_q, options, x_float=x_f).tobytes()

    def error(q):  # held-out inputs as the quantized model feeds them, against the float output
        return float(np.mean((layer.forward(held_q, dequantize_array(q, params)) - layer.forward(held_f)) ** 2))

    assert error(aimed) < 0.8 * error(plain) < error(nearest)
    with pytest.raises(ConfigError, match="do not match"):
        gptq_round(layer, params, scheme, x_q, options, x_float=x_f[:1])


def test_gptq_options_are_validated():
    with pytest.raises(ConfigError, match="block_size"):
        GPTQOptions(block_size=0)
    with pytest.raises(ConfigError, match="stability_ratio"):
        GPTQOptions(stability_ratio=0.0)


# -- AdaRound ----------------------------------------------------------------------------------
def test_adaround_without_torch_names_the_extra(monkeypatch):
    from edgequant.algorithms import adaround as module

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch → ImportError
    layer = Layer("MatMul", np.ones((2, 1), np.float32))
    with pytest.raises(ConfigError, match=r"edgequant\[torch\]"):
        module.adaround(layer, int8_unit_scale(), Scheme(), np.ones((1, 2), np.float32), np.ones((1, 1), np.float32))


def test_beta_schedule_worked_example():
    from edgequant.algorithms.adaround import AdaRoundOptions, beta_at

    options = AdaRoundOptions(steps=1000)
    assert beta_at(100, options) is None
    assert [beta_at(s, options) for s in (200, 600, 1000)] == pytest.approx([20, 11, 2])


@pytest.mark.parametrize("quant", QUANT_CASES)
@pytest.mark.parametrize("kind", ["conv", "depthwise", "gemm"])
def test_adaround_beats_nearest_on_held_out_inputs(kind, quant):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from edgequant.algorithms.adaround import AdaRoundOptions, adaround

    layer, x, held_out, params, scheme, nearest = setup_case(kind, quant)
    snapshot = (params.scale.copy(), params.zero_point.copy())
    target = layer.forward(x)
    options = AdaRoundOptions(steps=600)
    q, stats = adaround(layer, params, scheme, x, target, options)
    q_again, _ = adaround(layer, params, scheme, x, target, options)
    check_rounding(layer, params, scheme, held_out, nearest, q, q_again, snapshot)
    assert np.abs(q.astype(int) - nearest.astype(int)).max() <= 1  # floor or floor + 1
    assert stats.steps == 600 and stats.rows == layer.row_count(x) and stats.seconds > 0
    rtn = float(np.mean((layer.forward(x, dequantize_array(nearest, params)) - target) ** 2))
    assert stats.mse_before == pytest.approx(rtn, rel=1e-3)  # all rows kept: the same rows
    assert stats.mse_after < stats.mse_before


def test_adaround_samples_rows_and_reports_progress():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from edgequant.algorithms.adaround import AdaRoundOptions, adaround

    layer, x, _, params, scheme, _ = setup_case("conv", "int4-per-channel")
    calls: list[tuple[int, int]] = []
    options = AdaRoundOptions(steps=200, max_rows=500, data_count=8)
    _, stats = adaround(layer, params, scheme, x, layer.forward(x), options, progress=lambda s, n: calls.append((s, n)))
    assert stats.rows == 500
    assert calls == [(100, 200), (200, 200)]
    with pytest.raises(ConfigError, match="target of shape"):
        adaround(layer, params, scheme, x, layer.forward(x)[:, :5], options)


def test_supported_reads_node_attributes():
    from edgequant.algorithms.layer import supported

    assert supported(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]))
    assert supported(helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="VALID"))
    assert not supported(helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER"))
    assert not supported(helper.make_node("Gemm", ["x", "w"], ["y"], transA=1))
    assert supported(helper.make_node("MatMul", ["x", "w"], ["y"]))
    assert not supported(helper.make_node("Relu", ["x"], ["y"]))


def test_gptq_float_target_steps_back_where_a_fit_on_few_rows_would_overfit():
    rng = np.random.default_rng(6)
    layer = Layer("Gemm", (rng.standard_normal((16, 64)) / 8).astype(np.float32), {"transB": 1})
    _, params = weight_params(layer.weight, QuantDType.INT4, True, 0, Scheme())
    x_f, held_f = correlated_gemm_inputs(72, 7), correlated_gemm_inputs(2048, 8)  # 72 rows, 64 inputs
    x_q = (x_f + 0.3 * rng.standard_normal(x_f.shape)).astype(np.float32)  # noise only: nothing to learn
    held_q = (held_f + 0.3 * rng.standard_normal(held_f.shape)).astype(np.float32)
    options = GPTQOptions(block_size=16)

    def error(q):
        return float(np.mean((layer.forward(held_q, dequantize_array(q, params)) - layer.forward(held_f)) ** 2))

    plain = error(gptq_round(layer, params, Scheme(), x_q, options))
    aimed = error(gptq_round(layer, params, Scheme(), x_q, options, x_float=x_f))
    assert aimed < 1.05 * plain, (aimed, plain)
