"""Quantization maths against oracles: onnx.reference Q/DQ and the textbook formulas."""

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import compute_params, dequantize_array, quantize_array, quantize_bias


def reference_quantize(x, scale, zp, axis=None):
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **({"axis": axis} if axis is not None else {}))
    return ReferenceEvaluator(node).run(None, {"x": x, "s": scale, "z": zp})[0]


def reference_dequantize(q, scale, zp, axis=None):
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **({"axis": axis} if axis is not None else {}))
    return ReferenceEvaluator(node).run(None, {"q": q, "s": scale, "z": zp})[0]


@pytest.mark.parametrize("dtype", [QuantDType.UINT8, QuantDType.INT8, QuantDType.INT16, QuantDType.UINT16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_matches_onnx_reference(dtype, symmetric, rng):
    x = (rng.standard_normal(1000) * 3 + 0.5).astype(np.float32)
    p = compute_params(x.min(), x.max(), dtype, symmetric)
    ours = quantize_array(x, p)
    ref = reference_quantize(x, p.scale, p.zero_point)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(dequantize_array(ours, p), reference_dequantize(ref, p.scale, p.zero_point), rtol=1e-6)
    # round-trip error bounded by half a step inside the range
    inside = (x >= x.min()) & (x <= x.max())
    assert np.abs(dequantize_array(ours, p)[inside] - x[inside]).max() <= p.scale * 0.5 + 1e-6


def test_asymmetric_formula_worked_example():
    p = compute_params(-1.0, 3.0, QuantDType.UINT8, symmetric=False)
    assert p.scale == pytest.approx(4 / 255)
    assert int(p.zero_point) == 64  # round(0 - (-1) / (4/255)) = round(63.75)
    assert p.dtype is QuantDType.UINT8


def test_symmetric_zero_point_and_range():
    p = compute_params(-2.0, 1.0, QuantDType.INT8, symmetric=True)
    assert int(p.zero_point) == 0 and p.scale == pytest.approx(2.0 / 127)
    u = compute_params(-2.0, 1.0, QuantDType.UINT8, symmetric=True)
    assert int(u.zero_point) == 128


def test_range_includes_zero_and_zero_width():
    p = compute_params(2.0, 5.0, QuantDType.UINT8, symmetric=False)
    assert int(p.zero_point) == 0 and p.scale == pytest.approx(5 / 255)
    z = compute_params(0.0, 0.0, QuantDType.INT8, symmetric=True)
    assert z.scale == 1.0 and int(z.zero_point) == 0


def test_per_channel_matches_reference(rng):
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * np.array([0.1, 1, 10, 100], np.float32)[:, None, None, None]
    amax = np.abs(w).reshape(4, -1).max(1)
    p = compute_params(-amax, amax, QuantDType.INT8, symmetric=True, axis=0)
    assert p.scale.shape == (4,)
    np.testing.assert_array_equal(quantize_array(w, p), reference_quantize(w, p.scale, p.zero_point, axis=0))
    # each channel uses its full range
    assert (np.abs(quantize_array(w, p)).reshape(4, -1).max(1) == 127).all()


def test_rounding_is_half_to_even():
    p = compute_params(-127.0, 127.0, QuantDType.INT8, symmetric=True)  # scale 1
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32)
    np.testing.assert_array_equal(quantize_array(x, p), [0, 2, 2, 0, -2])


def test_bias_scale_is_input_times_weight():
    b = np.array([0.5, -1.0, 2.0], np.float32)
    w_scale = np.array([0.01, 0.02, 0.04], np.float32)
    q, scale, clipped = quantize_bias(b, 0.1, w_scale)
    np.testing.assert_allclose(scale, 0.1 * w_scale, rtol=1e-6)
    assert q.dtype == np.int32 and clipped == 0
    np.testing.assert_array_equal(q, np.rint(b / (0.1 * w_scale)).astype(np.int32))
    _, _, clipped = quantize_bias(np.array([1e12], np.float32), 1e-3, np.array([1e-3], np.float32))
    assert clipped == 1


def test_dtype_facts():
    assert (QuantDType.INT16.qmin, QuantDType.INT16.qmax, QuantDType.INT16.min_opset) == (-32768, 32767, 21)
    assert QuantDType.UINT8.onnx_type == TensorProto.UINT8 and not QuantDType.UINT8.signed
    assert (QuantDType.INT4.qmin, QuantDType.INT4.qmax, QuantDType.INT4.bits, QuantDType.INT4.min_opset) == (-8, 7, 4, 21)
    assert QuantDType.UINT4.onnx_type == TensorProto.UINT4 and QuantDType.UINT4.qmax == 15
    with pytest.raises(Exception, match="valid: int8"):
        QuantDType.parse("int3")


def test_fit_bias_raises_the_scale_of_a_dead_channel_only():
    from edgequant.quant.dtypes import QuantDType
    from edgequant.quant.params import QuantParams, fit_bias, quantize_bias

    p = QuantParams(np.array([0.01, 1e-12], np.float32), np.zeros(2, np.int8), QuantDType.INT8, 0)
    bias = np.array([0.5, 1.0], np.float32)
    assert quantize_bias(bias, 0.01, p.scale)[2] == 1  # the dead channel's bias would be clipped
    fitted = fit_bias(p, bias, 0.01)
    assert fitted.scale[0] == p.scale[0] and fitted.scale[1] > p.scale[1]
    q, scale, clipped = quantize_bias(bias, 0.01, fitted.scale)
    assert clipped == 0 and np.allclose(q * scale.astype(np.float64), bias, rtol=1e-6)
    assert fit_bias(QuantParams(np.array([0.01, 0.02], np.float32), np.zeros(2, np.int8), QuantDType.INT8, 0),
                    bias, 0.01) is None
