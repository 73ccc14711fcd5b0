"""Target profiles: scheme maths, the rules they put in the model, validators, and a numpy
simulation of the integer arithmetic a power-of-two target runs."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgequant
from edgequant.config.schema import load_config
from edgequant.errors import ConfigError
from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import Scheme, compute_params, quantize_array
from edgequant.targets import PROFILES, TARGET_FIELDS, check_model, get_target
from tests.unit.test_quantize_graphs import calib, cnn


def test_scheme_maths():
    p = compute_params(-1.0, 1.5, QuantDType.INT8, True, scheme=Scheme(power_of_two=True))
    assert float(p.scale) == 2.0**-6  # 1.5/127 = 0.0118 → rounded up to 2^-6, never clipping
    narrow = compute_params(-1.0, 1.0, QuantDType.INT8, True, scheme=Scheme(narrow_range=True))
    assert float(narrow.scale) == pytest.approx(1 / 127)
    q = quantize_array(np.array([-1.0, 0.5 / 127, 1.5 / 127]), narrow, Scheme(narrow_range=True, rounding="half_up"))
    assert q.tolist() == [-127, 1, 2]  # half up: 0.5 → 1, 1.5 → 2 (half even would give 0 and 2)
    assert quantize_array(np.array([0.5 / 127]), narrow).tolist() == [0]
    with pytest.raises(ConfigError):
        Scheme(rounding="stochastic")


def test_every_profile_quantizes_a_model_that_obeys_it(rng):
    model, data = cnn(rng), calib(rng)
    for name in PROFILES:
        r = edgequant.quantize(model, data, target=name, collapse_cosine=0)
        onnx.checker.check_model(r.model)
        assert check_model(r.model, get_target(name)) == [], name
        assert r.options.target == name


def test_validator_finds_broken_rules(rng):
    model, data = cnn(rng), calib(rng)
    generic = edgequant.quantize(model, data).model
    problems = check_model(generic, get_target("espdl"))
    assert any("power of two" in p.rule for p in problems)
    assert any(p.rule == "symmetric quantization needs zero point 0" for p in problems)
    assert any(p.rule == "type uint8 is not one the target runs" for p in problems)
    per_tensor = edgequant.quantize(model, data, target="espdl-s3").model
    assert any("per channel" in p.rule for p in check_model(per_tensor, get_target("espdl")))
    with pytest.raises(ConfigError, match="did you mean"):
        get_target("esp-dl")


def test_profile_rules_show_in_the_model(rng):
    model, data = cnn(rng), calib(rng)
    neuro = edgequant.quantize(model, data, target="neuropilot").model
    acts = [n for n in neuro.graph.node if n.op_type == "QuantizeLinear"]
    inits = {t.name: numpy_helper.to_array(t) for t in neuro.graph.initializer}
    assert acts and all(inits[n.input[2]].dtype == np.uint8 for n in acts)
    esp = edgequant.quantize(model, data, target="espdl")
    scales = [numpy_helper.to_array(t) for t in esp.model.graph.initializer if t.name.endswith("_scale")]
    assert scales and all(np.all(np.log2(s) == np.round(np.log2(s))) for s in scales)
    explicit = edgequant.quantize(model, data, target="espdl", per_channel=False)
    assert explicit.options.per_channel is False and explicit.options.scheme.power_of_two  # explicit wins


def test_power_of_two_conv_matches_integer_arithmetic(rng):
    """A Conv of an espdl model computed the way the chip does (tests/simulate.py): int8 × int8 →
    int32 accumulator + int32 bias, then a shift by (e_in + e_w − e_out) with rounding half up."""
    from tests.simulate import first_conv_difference

    model, data = cnn(rng), calib(rng)
    r = edgequant.quantize(model, data, target="espdl")
    diff, m = first_conv_difference(r, {"x": data[0]}, stride=1, pad=1)
    assert np.allclose(np.log2(m), np.round(np.log2(m)))  # the rescale is a shift
    assert diff.max() <= 1 and (diff == 0).mean() > 0.97  # ties round half up on chip, half even in ORT


def test_narrow_bias_accumulator_is_fitted_or_refused(rng):
    model, data = cnn(rng), calib(rng)
    r = edgequant.quantize(model, data, scheme=Scheme(bias_bits=16), collapse_cosine=0)
    biases = [numpy_helper.to_array(t) for t in r.model.graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert biases and all(np.abs(b).max() < 2**15 for b in biases)
    with pytest.raises(ConfigError, match="needs more than 4 bits"):
        edgequant.quantize(model, data, scheme=Scheme(bias_bits=4), collapse_cosine=0)


def test_int4_weights_w4a8_and_w4a16(rng):
    from tests.conftest import run

    model, data = cnn(rng), calib(rng)
    for act in ("uint8", "int16"):
        r = edgequant.quantize(model, data, weight_dtype="int4", activation_dtype=act)
        onnx.checker.check_model(r.model, full_check=True)
        packed = [t for t in r.model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
        assert packed and r.summary.opset[1] >= 21
        w = numpy_helper.to_array(packed[0])
        assert w.min() >= -8 and w.max() <= 7
        assert r.summary.fidelity[0].cosine > 0.99
        out = run(r.model, {"x": data[0]})[0]
        assert np.isfinite(out).all()
    wide = edgequant.quantize(model, data, overrides=["op:Gemm=weight=int4"])
    assert [w.dtype for k, w in wide.plan.weight_items() if k[0].startswith("Gemm")] == [QuantDType.INT4]
    with pytest.raises(ConfigError, match="4-bit types are for weights"):
        edgequant.quantize(model, data, activation_dtype="int4")
    with pytest.raises(ConfigError, match="4-bit is for weights"):
        edgequant.quantize(model, data, overrides=["Conv_0=int4"])


def test_granularity_by_op_type(rng):
    model, data = cnn(rng), calib(rng)
    r = edgequant.quantize(model, data, target="acuity-perchannel")
    axes = {k[0].split("_")[0]: w.axis for k, w in r.plan.weight_items()}
    assert axes["Conv"] == 0 and axes["Gemm"] is None
    assert check_model(r.model, get_target("acuity-perchannel")) == []
    assert any("per tensor" in v.rule for v in check_model(edgequant.quantize(model, data).model,
                                                               get_target("acuity-perchannel")))


def test_npu_targets_refuse_control_flow_that_specialization_would_fold(rng):
    from tests.unit.test_specialize import batch_test_model

    model = batch_test_model()
    data = [{"x": rng.standard_normal((1, 4)).astype(np.float32), "k": np.array(5 + i % 2, np.int64)} for i in range(12)]
    kept = edgequant.quantize(model, data, target="espdl", specialize=False, collapse_cosine=0)
    found = check_model(kept.model, get_target("espdl"))
    assert any("runs no control flow" in v.rule and v.tensor == "outer" for v in found), found
    assert not any("control flow" in v.rule for v in check_model(kept.model, get_target("generic")))
    folded = edgequant.quantize(model, data, target="espdl", fixed_inputs={"k": 5}, collapse_cosine=0)
    assert not any("control flow" in v.rule for v in check_model(folded.model, get_target("espdl")))
    assert dict(get_target("espdl").rules())["control flow"].startswith("none")


def test_npu_targets_quantize_conv_relu_once_after_the_activation(rng):
    """TPU-MLIR, ESP-DL and Acuity compile Conv+Relu (and Conv+Relu6) as one op: the symmetric
    profiles put no Q/DQ between the Conv and its Relu, and the Relu stays (a symmetric
    QuantizeLinear does not saturate at 0). generic-s8s8 (onnxruntime) quantizes both."""
    model, data = cnn(rng), calib(rng)
    for target, fused in (("tpu-mlir", True), ("espdl", True), ("acuity-dfp8", True), ("generic-s8s8", False)):
        r = edgequant.quantize(model, data, target=target, collapse_cosine=0)
        quantized = {n.input[0].removesuffix("_float") for n in r.model.graph.node if n.op_type == "QuantizeLinear"}
        assert ("c1" in quantized) is not fused and "r1" in quantized, target
        assert [n.op_type for n in r.model.graph.node].count("Relu") == 1
        assert check_model(r.model, get_target(target)) == []
    plain = edgequant.quantize(model, data, target="tpu-mlir", fusions=(), collapse_cosine=0)
    assert "c1_float" in {n.input[0] for n in plain.model.graph.node if n.op_type == "QuantizeLinear"}


SILU = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 4, 8, 8] p, float[1, 8, 5] e) {
    c = Conv <pads = [1, 1, 1, 1]> (x, W, B)
    s = Sigmoid (c)
    y = Mul (c, s)
    p = Sigmoid (y)
    f = Reshape (y, S)
    m = MatMul (f, M)
    e = Exp (m)
}
"""


def test_tpu_mlir_profile_quantizes_what_tpu_mlir_quantizes(rng):
    """Every op (Exp too) and the outputs; SiLU as one op; Sigmoid over [0, 1]; a tensor that is
    never negative unsigned; MatMul weights per tensor, convolutions per channel."""
    from tests.conftest import parse

    m = parse(SILU, check=False)
    for name, v in (("W", rng.standard_normal((4, 3, 3, 3))), ("B", rng.standard_normal(4)),
                    ("M", rng.standard_normal((32, 5)))):
        m.graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), name))
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 8, 32], np.int64), "S"))
    data = calib(rng)
    r = edgequant.quantize(m, data, target="tpu-mlir", collapse_cosine=0)
    assert check_model(r.model, get_target("tpu-mlir")) == []
    plan = r.plan
    assert "s" not in plan.activations and "c" in plan.activations  # x · Sigmoid(x) is one op: SiLU, reading c
    assert {"y", "p", "e", "m"} <= set(plan.activations)  # Exp quantized, outputs too
    assert r.ranges["p"] == (0.0, 1.0)  # TPU-MLIR's Sigmoid range, whatever calibration saw
    assert r.params["p"].zero_point.dtype == np.uint8 and r.params["e"].zero_point.dtype == np.uint8  # ≥ 0
    assert r.params["y"].zero_point.dtype == np.int8
    axes = {wp.tensor: wp.axis for (_, _), wp in plan.weight_items()}
    assert axes["W"] == 0 and axes["M"] is None  # model_deploy: per-channel Conv, per-tensor MatMul
    generic = edgequant.quantize(m, data, collapse_cosine=0).plan
    assert "e" not in generic.activations and "s" in generic.activations


RESIDUAL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 256] p) {
    c = Conv <pads = [1, 1, 1, 1]> (x, W)
    d = Conv <pads = [1, 1, 1, 1]> (x, W)
    a = Add (c, d)
    y = Relu (a)
    f = Flatten (y)
    p = Softmax (f)
}
"""


def test_espdl_aligns_add_inputs_to_the_output_and_hands_softmax_over_in_float(rng):
    """esp-ppq (ESP-DL) gives the inputs of an Add (read by it alone) the output's exponent, runs
    Add+Relu as one op, quantizes the graph outputs but Softmax's; a host target does neither."""
    from tests.conftest import parse

    m = parse(RESIDUAL, check=False)
    m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W"))
    data = [rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(16)]
    for target in ("espdl", "espdl-s3"):
        r = edgequant.quantize(m, data, target=target, collapse_cosine=0)
        acts = r.plan.activations
        assert acts["c"].root == acts["d"].root == "y" and "a" not in acts  # Add+Relu: one op, one exponent
        assert "y" in acts and "p" not in acts  # the Relu output quantized; Softmax hands over float
        assert check_model(r.model, get_target(target)) == []
    host = edgequant.quantize(m, data, target="generic-s8s8", collapse_cosine=0).plan.activations
    assert host["c"].root == "c" and "p" not in host


STEM = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, H, W] x) => (float[1, 16, H, W] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    r1 = Relu (c1)
    d1 = Conv <pads = [1, 1, 1, 1], group = 16> (r1, WD, BD)
    r2 = Relu (d1)
    y = Conv (r2, W2, B2)
}
"""


def _stem(rng, size):
    from tests.unit.test_quantize_graphs import with_weights

    text = STEM.replace("H, W", f"{size}, {size}") if size else STEM
    return with_weights(text, rng, W1=(16, 3, 3, 3), B1=(16,), WD=(16, 1, 3, 3), BD=(16,), W2=(16, 16, 1, 1), B2=(16,))


def _float_convs(model) -> list[str]:
    """Conv nodes whose weight is a float initializer (not read through DequantizeLinear)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits
            and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]


def test_generic_leaves_a_large_narrow_stem_float_where_onnxruntime_runs_it_faster(rng):
    from edgequant.planning.plan import NARROW_CONV_MACS

    model = _stem(rng, 64)  # the 3 → 16 stem: 64·64·16·27 = 1.77 M MACs
    assert 64 * 64 * 16 * 27 >= NARROW_CONV_MACS
    data = [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(8)]
    r = edgequant.quantize(model, data, num_samples=6, eval_samples=2)
    stem = r.model.graph.node[[n.op_type for n in r.model.graph.node].index("Conv")]
    assert _float_convs(r.model) == [stem.name]  # the depthwise and the 16-channel 1×1 Convs stay int8
    assert stem.input[0] == "x"  # the float input straight in, no Q/DQ before it
    assert r.plan.precision == {stem.name: "float"}
    assert any("1 Conv reading fewer than 8 input channels stays float" in n and "--quantize-narrow-convs" in n
               for n in r.summary.notes)
    eight, total = r.summary.eight_bit_macs
    assert total - eight == 64 * 64 * 16 * 27
    # the switch, the NPU targets and the config key quantize it
    assert _float_convs(edgequant.quantize(model, data, num_samples=6, eval_samples=2, float_narrow_convs=0).model) == []
    assert _float_convs(edgequant.quantize(model, data, num_samples=6, eval_samples=2, target="neuropilot").model) == []
    cfg = {"model_parameters": {"onnx_model": "m.onnx"}, "quantization_parameters": {"float_narrow_convs": 0}}
    assert load_config(cfg).options.float_narrow_convs == 0
    with pytest.raises(ConfigError, match="float_narrow_convs must be ≥ 0"):
        edgequant.quantize(model, data, float_narrow_convs=-1)


def test_a_small_narrow_conv_stays_int8_and_an_unknown_size_counts_as_large(rng):
    data = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(8)]
    small = edgequant.quantize(_stem(rng, 8), data, num_samples=6, eval_samples=2)  # 27 648 MACs
    assert _float_convs(small.model) == []
    assert not any("input channels" in n for n in small.summary.notes)
    from edgequant.planning.plan import narrow_convs

    assert narrow_convs(_stem(rng, 0), 8) == [_stem(rng, 0).graph.node[0].name]  # H, W symbolic


FILTERS = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 1, 1, 16384] x) => (float[1, 1, 1, 8065] y, float[1, 36, 1, 8065] z) {
    y = Conv <strides = [1, 2]> (x, W1)
    z = Conv <strides = [1, 2]> (x, W36)
}
"""


def test_a_single_filter_is_narrow_and_a_wide_bank_of_long_filters_is_not(rng):
    """1 → 1 with 256 taps: a GEMM of one output column (5-12× slower in int8 on basic-pitch);
    1 → 36 with 256 taps: 256 × 36, as fast in int8 (and 8-bit MACs it keeps)."""
    from edgequant.planning.plan import name_nodes, narrow_convs
    from tests.unit.test_quantize_graphs import with_weights

    m = with_weights(FILTERS, rng, W1=(1, 1, 1, 256), W36=(36, 1, 1, 256))  # 8065 · 256 = 2.06 M MACs each
    name_nodes(m)
    assert narrow_convs(m, 8) == [m.graph.node[0].name]


def test_a_config_target_brings_the_whole_profile_as_the_option_does():
    cfg = {"model_parameters": {"onnx_model": "m.onnx"}, "quantization_parameters": {"target": "espdl"}}
    got = load_config(cfg).options
    from edgequant.planning.options import parse_options

    want = parse_options(None, {"target": "espdl"})
    for field in TARGET_FIELDS:
        assert getattr(got, field) == getattr(want, field), field
    assert got.fusions == ("relu", "pad", "bias") and got.quantize_outputs and got.float_narrow_convs == 0
    explicit = load_config({**cfg, "quantization_parameters": {"target": "espdl-s3", "per_channel": True}}).options
    assert explicit.per_channel and explicit.scheme.power_of_two
