"""Recovery stages on the calibrated state: bias correction, edits, options and their surface."""

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgequant
from edgequant.algorithms.bias_correction import MIN_VALUES, add_zero_biases, bias_layers
from edgequant.api import calibrate
from edgequant.runtime.session import make_session
from edgequant.transform.qdq import Edits, insert_qdq
from tests.unit.test_quantize_graphs import calib, cnn, with_weights

NO_BIAS = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] x) => (float[N, 6, 8, 8] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, W1)
    r1 = Relu (c1)
    y = Conv <pads = [1, 1, 1, 1]> (r1, W2)
}
"""


def _errors(qmodel, model, q_names, f_names, feeds, relu):
    """Independent of the library's own reduction: all values of both models, then the mean of
    (quantized − float) per channel, where the float value is > 0 for a layer Relu follows."""
    q_sess, f_sess = make_session(qmodel, q_names), make_session(model, f_names)
    out = []
    for k in range(len(q_names)):
        q = np.concatenate([_rows(q_sess.run([q_names[k]], f)[0]) for f in feeds], axis=1)
        fl = np.concatenate([_rows(f_sess.run([f_names[k]], f)[0]) for f in feeds], axis=1)
        mask = fl > 0 if relu[k] else np.ones_like(fl, bool)
        out.append(np.where(mask, q - fl, 0).sum(axis=1) / np.maximum(mask.sum(axis=1), 1))
    return out


def _rows(v):
    return np.moveaxis(v, 1, 0).reshape(v.shape[1], -1)


def _layer_errors(state, edits):
    """Per corrected layer (the Convs: the Gemm has one value per sample, too few), the channel
    means of its output error in the QDQ model."""
    qmodel = insert_qdq(state.model, state.plan, state.params(state.plan), edits)
    by_name = {n.name: n for n in qmodel.graph.node}
    layers = [lay for lay in bias_layers(state.model, state.plan) if lay.node.op_type == "Conv"]
    feeds = list(state.samples(0, state.split.calibration))
    return _errors(qmodel, state.model, [by_name[lay.node.name].output[0] for lay in layers],
                   [lay.node.output[0] for lay in layers], feeds, [True, False])


@pytest.mark.parametrize("kind", [{"target": "espdl-s3"}, {"weight_dtype": "int4", "per_channel": False}])
def test_empirical_bias_correction_leaves_no_mean_error_in_the_corrected_layers(kind, rng):
    m = cnn(rng)
    data = [{"x": x + 0.5} for x in calib(rng, 40)]  # inputs with a mean: rounding shifts the outputs' means
    plain = calibrate(m, data, eval_samples=8, **kind)
    fixed = calibrate(m, data, eval_samples=8, bias_correction="empirical", **kind)
    before = _layer_errors(plain, Edits())
    after = _layer_errors(fixed, fixed.edits)
    assert len(before) == 2 and fixed.recovery[0].layers == 3
    for b, a in zip(before, after):
        assert np.abs(a).max() < 0.1 * np.abs(b).max() + 1e-6  # the mean error is (almost) all gone
    assert fixed.recovery[0].after < 0.05 * fixed.recovery[0].before
    assert fixed.plan.weights == plain.plan.weights  # the plan is the same: only biases moved
    gemm = next(lay for lay in bias_layers(fixed.model, fixed.plan) if lay.node.op_type == "Gemm")
    b3 = numpy_helper.to_array(next(t for t in fixed.model.graph.initializer if t.name == gemm.bias))
    np.testing.assert_array_equal(fixed.edits.biases[gemm.key], b3)  # 32 values a channel: left alone


def test_fast_bias_correction_removes_the_weight_rounding_shift(rng):
    m = cnn(rng)
    data = [{"x": x + 1.0} for x in calib(rng, 30)]  # inputs with a mean: a visible shift
    state = calibrate(m, data, target="espdl-s3", bias_correction="fast")
    inits = {t.name: numpy_helper.to_array(t) for t in state.model.graph.initializer}
    lay = bias_layers(state.model, state.plan)[0]
    new = state.edits.biases[lay.key]
    assert not np.allclose(new, inits[lay.bias])
    assert "removed" in state.recovery[0].line()


LINEAR = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 24, 16] x) => (float[N, 24, 8] y) {
    m1 = MatMul (x, W1)
    h = Add (m1, B1)
    r = Relu (h)
    m2 = MatMul (r, W2)
    y = Add (B2, m2)
}
"""


def _last_axis_errors(state, edits, layers, feeds):
    """Independent of the library's reduction: per layer, the mean of (quantized − float) per
    channel of the last axis over every value of every feed, where the float value is > 0 for
    the layer a Relu follows (the first); and how many values each channel's mean has."""
    qmodel = insert_qdq(state.model, state.plan, state.params(state.plan), edits)
    by_name = {n.name: n for n in qmodel.graph.node}
    q_names = [by_name[lay.node.name].output[0] for lay in layers]  # before the output's own Q/DQ
    f_names = [lay.node.output[0] for lay in layers]
    q_sess, f_sess = make_session(qmodel, q_names), make_session(state.model, f_names)
    out = []
    for k in range(len(layers)):
        q = np.concatenate([q_sess.run([q_names[k]], f)[0].reshape(-1, 12 if k == 0 else 8) for f in feeds])
        fl = np.concatenate([f_sess.run([f_names[k]], f)[0].reshape(q.shape[0] // len(feeds), -1) for f in feeds])
        mask = fl > 0 if k == 0 else np.ones_like(fl, bool)
        out.append((np.where(mask, q - fl, 0).sum(axis=0) / np.maximum(mask.sum(axis=0), 1), mask.sum(axis=0)))
    return out


@pytest.mark.parametrize("kind", [{}, {"target": "espdl-s3"}])
def test_bias_correction_corrects_the_add_after_a_matmul(kind, rng):
    """A Linear layer as exporters write it (MatMul, then Add of a constant): the mean error of
    the Add's output per channel (the last axis) is (almost) all gone, for the generic target,
    which quantizes the constant as the Add's operand, and for espdl-s3, which fuses the Add
    into the MatMul and keeps it float. Generic quantizes the constant from its corrected values
    (its range follows). The fast form moves the constants too. A plan that leaves the MatMuls
    float reads the original constants: the correction was measured for 4-bit weights."""
    m = with_weights(LINEAR, rng, W1=(16, 12), B1=(12,), W2=(12, 8), B2=(1, 1, 8))
    data = [{"x": rng.standard_normal((1, 24, 16)).astype(np.float32) + 0.7} for _ in range(40)]
    opts = dict(weight_dtype="int4", per_channel=False, eval_samples=8, **kind)
    plain = calibrate(m, data, **opts)
    fixed = calibrate(m, data, bias_correction="empirical", **opts)
    layers = bias_layers(fixed.model, fixed.plan)
    adds = [n.name for n in fixed.model.graph.node if n.op_type == "Add"]
    assert [(lay.node.name, lay.compute.op_type, lay.bias, lay.axis) for lay in layers] == [
        (adds[0], "MatMul", "B1", -1), (adds[1], "MatMul", "B2", -1)]
    feeds = list(fixed.samples(0, fixed.split.calibration))
    before = _last_axis_errors(plain, Edits(), layers, feeds)
    after = _last_axis_errors(fixed, fixed.edits, layers, feeds)
    for (b, count), (a, _) in zip(before, after):  # a channel with too few active values is left be
        measured = count >= MIN_VALUES
        assert measured.sum() >= 6 and np.abs(a[measured]).max() < 0.1 * np.abs(b[measured]).max() + 1e-6, (b, a)
    assert fixed.recovery[0].layers == 2 and fixed.recovery[0].after < 0.1 * fixed.recovery[0].before
    corrected = fixed.edits.biases[layers[0].key]
    original = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "B1"))
    assert corrected.shape == original.shape and not np.allclose(corrected, original)
    qmodel, _ = fixed.assemble(fixed.plan)
    if not kind:  # the constant is quantized from the corrected values, to within half a step
        dq = next(n.output[0] for n in qmodel.graph.node if n.op_type == "DequantizeLinear" and
                  n.input[0].startswith("B1"))
        got = make_session(qmodel, [dq]).run([dq], feeds[0])[0]
        step = (max(corrected.max(), 0) - min(corrected.min(), 0)) / 255
        np.testing.assert_allclose(got, corrected, atol=step / 2 + 1e-6)
    fast = calibrate(m, data, bias_correction="fast", **opts)
    assert not np.allclose(fast.edits.biases[layers[1].key], numpy_helper.to_array(m.graph.initializer[3]))
    floated, _ = fixed.assemble(fixed.plan_with([edgequant.Override(name, "float") for name in
                                                 ("MatMul_0", "MatMul_3")]))
    q_sess, f_sess = make_session(floated), make_session(plain.assemble(plain.plan_with(
        [edgequant.Override(name, "float") for name in ("MatMul_0", "MatMul_3")]))[0])
    np.testing.assert_array_equal(q_sess.run(None, feeds[0])[0], f_sess.run(None, feeds[0])[0])


def test_a_matmul_layers_error_is_the_shift_most_positions_share(rng):
    """The trimmed mean of a channel's errors: a few huge errors (a transformer's outlier tokens)
    do not move it, where they move the mean; NaN (not measured) is left out, and a channel with
    fewer than ``MIN_VALUES`` measured values gets no estimate."""
    from edgequant.algorithms.bias_correction import _trimmed_mean

    errors = np.full((3, 1000), 0.1, np.float32) + rng.normal(0, 0.01, (3, 1000)).astype(np.float32)
    errors[0, :20] = -50.0  # 2 % outliers: mean −0.90
    errors[1, 500:] = np.nan
    errors[2, MIN_VALUES - 1:] = np.nan
    sums, counts = _trimmed_mean(errors)
    assert errors[0].mean() < -0.8
    np.testing.assert_allclose(sums[:2] / counts[:2], 0.1, atol=0.002)
    assert counts[0] == pytest.approx(800, abs=2) and counts[1] == pytest.approx(400, abs=2) and counts[2] == 0


def test_zero_biases_keep_the_float_model_and_get_corrected(rng):
    m = with_weights(NO_BIAS, rng, W1=(4, 3, 3, 3), W2=(6, 4, 3, 3))
    x = calib(rng, 1)[0]
    want = make_session(m).run(None, {"x": x})[0]
    copy = onnx.ModelProto()
    copy.CopyFrom(m)
    assert add_zero_biases(copy) == 2
    np.testing.assert_allclose(make_session(copy).run(None, {"x": x})[0], want, rtol=1e-6, atol=1e-6)
    state = calibrate(m, [{"x": v} for v in calib(rng, 20)], bias_correction="empirical")
    assert len(state.edits.biases) == 2


def test_recovery_is_off_by_default_and_changes_nothing(rng):
    m, data = cnn(rng), [{"x": x} for x in calib(rng)]
    a = edgequant.quantize(m, data, target="espdl-s3")
    b = edgequant.quantize(m, data, target="espdl-s3", bias_correction=None, adaround=False, gptq=False, cle=False,
                           smoothquant=None, finetune_level=0)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.summary.recovery == [] == b.summary.recovery


def test_recovery_options_parse_with_neuropilot_names():
    opts = edgequant.make_options(use_adaround=True, adaround_optim_steps=200, use_bias_correction=True,
                                  hessian_opt_block_size=64, smoothquant=0.6)
    rec = opts.recovery
    assert rec.rounding == "adaround" and rec.bias == "empirical" and rec.adaround_optim_steps == 200
    assert rec.hessian_opt_block_size == 64 and rec.smoothquant == 0.6
    assert edgequant.make_options(finetune_level=1).recovery.rounding == "gptq"
    assert not edgequant.make_options().recovery
    for bad, match in (({"adaround": 1}, "must be bool"), ({"bias_correction": "x"}, "empirical or fast"),
                       ({"smoothquant": 2.0}, r"\[0, 1\]"), ({"smoothquant": "often"}, "or auto"),
                       ({"adaround_steps": 3}, "did you mean"),
                       ({"adaround": True, "gptq": True}, "not both")):
        with pytest.raises(edgequant.ConfigError, match=match):
            edgequant.make_options(**bad)
    assert edgequant.make_options(finetune_level=2).recovery.rounding == "blocks"
    assert edgequant.make_options(smoothquant="auto").recovery.smoothquant == "auto"
    assert edgequant.make_options(smoothquant="0.6").recovery.smoothquant == 0.6  # the CLI's text
    with pytest.raises(edgequant.NotYetSupportedError, match="levels above 2"):
        edgequant.make_options(finetune_level=3)


def test_a_fixed_weight_clipping_ratio_replaces_the_mse_search(rng):
    m, data = cnn(rng), [{"x": x} for x in calib(rng)]
    r = edgequant.quantize(m, data, weights_quantization_clipping_ratio=0.8)  # NeuroPilot's name
    assert r.options.weight_clipping_ratio == 0.8
    inits = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    w1 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "W1"))
    dq = next(n for n in r.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("W1"))
    want = 0.8 * np.abs(w1.reshape(4, -1)).max(axis=1) / 127  # symmetric int8, per output channel
    np.testing.assert_allclose(inits[dq.input[1]], want, rtol=1e-6)
    assert np.abs(inits[dq.input[0]]).max() == 127  # the largest weights now saturate
    with pytest.raises(edgequant.ConfigError, match=r"\(0, 1\]"):
        edgequant.make_options(weight_clipping_ratio=1.5)


CHAIN = """
<ir_version: 8, opset_import: ["" : 14]>
g (float[N, 3, 8, 8] x) => (float[N, 10] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
    c2 = Conv <pads = [1, 1, 1, 1]> (p1, W2, B2)
    r2 = HardSwish (c2)
    f = Flatten (r2)
    y = Gemm <transB = 1> (f, W3, B3)
}
"""


def test_block_reconstruction_runs_the_block_as_its_qdq_model_and_lowers_its_error(rng):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from edgequant.algorithms.blocks import _Runner, find_blocks
    from edgequant.algorithms.stage import round_blocks
    from edgequant.runtime.capture import capture, truncated

    m = with_weights(CHAIN, rng, W1=(8, 3, 3, 3), B1=(8,), W2=(8, 8, 3, 3), B2=(8,), W3=(10, 128), B3=(10,))
    data = [{"x": v} for v in calib(rng, 24)]
    state = calibrate(m, data, weight_dtype="int4", per_channel=False, eval_samples=4)
    blocks = find_blocks(state.model, state.plan, max_layers=2)
    assert [len(b.weights) for b in blocks] == [2, 1] and blocks[0].nodes[-1].op_type == "Flatten"
    params = state.params(state.plan)
    qmodel = insert_qdq(state.model, state.plan, params)
    by_name = {n.name: n for n in qmodel.graph.node}
    block = blocks[0]
    inits = {t.name: numpy_helper.to_array(t) for t in state.model.graph.initializer}
    from edgequant.transform.qdq import plain_weight

    weights = {n: (inits[wp.tensor], plain_weight(inits[wp.tensor], wp)[1]) for n, wp in block.weights.items()}
    biases = {n.name: inits[n.input[2]] for n in block.nodes if n.name in block.weights}
    runner = _Runner(torch, block, state.model, state.plan, params, weights, biases)
    q_in, q_out = by_name[block.nodes[0].name].input[0], by_name[block.nodes[-1].name].input[0]
    got = capture(truncated(qmodel, [q_in, q_out]), [q_in, q_out], data)
    # the runner's block (nearest rounding) against onnxruntime's QDQ model: what Flatten reads
    x = torch.from_numpy(np.concatenate(got[q_in]))
    out = runner.forward(x, None, nearest=True)  # the last node's output: Flatten(DQ(Q(HardSwish(c2))))
    want = np.concatenate(got[q_out]).reshape(len(data), -1)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)
    edits, report = round_blocks(state, state.plan, Edits())
    assert report.name == "block reconstruction" and report.layers == 3 and report.after < report.before
    assert edits.weights  # at least one block kept its learned rounding


RESIDUAL = """
<ir_version: 8, opset_import: ["" : 14]>
g (float[N, 8, 8, 8] x) => (float[N, 10] y) {
    c0 = Conv <pads = [1, 1, 1, 1]> (x, W0, B0)
    a0 = Relu (c0)
    c1 = Conv <pads = [0, 0, 0, 0]> (a0, W1, B1)
    r1 = HardSwish (c1)
    c2 = Conv <pads = [1, 1, 1, 1], group = 8> (r1, W2, B2)
    r2 = Relu (c2)
    c3 = Conv (r2, W3, B3)
    s = Add (c3, a0)
    p = GlobalAveragePool (s)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, W4, B4)
}
"""


def _residual(rng, text=None):
    return with_weights(text or RESIDUAL, rng, W0=(8, 8, 3, 3), B0=(8,), W1=(8, 8, 1, 1), B1=(8,),
                        W2=(8, 1, 3, 3), B2=(8,), W3=(8, 8, 1, 1), B3=(8,), W4=(10, 8), B4=(10,))


def _runner_matches_onnxruntime(torch, state, block, data):
    """The runner's block (nearest rounding) computes the last node's output (before its own
    Q) as onnxruntime's QDQ model does, from the same quantized input."""
    from edgequant.algorithms.blocks import _Runner
    from edgequant.runtime.capture import capture, truncated
    from edgequant.transform.qdq import plain_weight

    params = state.params(state.plan)
    qmodel = insert_qdq(state.model, state.plan, params)
    by_name = {n.name: n for n in qmodel.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in state.model.graph.initializer}
    weights = {n: (inits[wp.tensor], plain_weight(inits[wp.tensor], wp)[1]) for n, wp in block.weights.items()}
    biases = {n.name: inits[n.input[2]] for n in block.nodes if n.name in block.weights}
    runner = _Runner(torch, block, state.model, state.plan, params, weights, biases)
    q_in, q_out = by_name[block.nodes[0].name].input[0], by_name[block.nodes[-1].name].output[0]
    got = capture(truncated(qmodel, [q_in, q_out]), [q_in, q_out], data)
    out = runner.forward(torch.from_numpy(np.concatenate(got[q_in])), None, nearest=True)
    np.testing.assert_allclose(out.numpy(), np.concatenate(got[q_out]), rtol=1e-4, atol=1e-4)


def test_a_block_spans_a_residual_add_and_runs_as_its_qdq_model(rng):
    """``x → f(x) → f(x) + x`` is one block (the skip reads the block's input); the runner
    computes the Add's output as onnxruntime's QDQ model does, and reconstruction lowers its
    error."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from edgequant.algorithms.blocks import find_blocks
    from edgequant.algorithms.stage import round_blocks

    m = _residual(rng)
    data = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(24)]
    state = calibrate(m, data, weight_dtype="int4", per_channel=False, eval_samples=4)
    names = {n.name: n.output[0] for n in state.model.graph.node}
    blocks = find_blocks(state.model, state.plan, max_layers=3)
    ops = [[n.op_type for n in b.nodes] for b in blocks]
    # c0's block cannot reach c3 (four layers): it closes before the skip forks off a0
    # the block ends at the residual's Add, not at the longest closed run (… GlobalAveragePool, Flatten)
    assert ops == [["Conv", "Relu"], ["Conv", "HardSwish", "Conv", "Relu", "Conv", "Add"], ["Gemm"]]
    assert blocks[1].input == names[blocks[0].nodes[-1].name] and len(blocks[1].weights) == 3
    # with two layers a block no residual closes: no block holds the Add
    short = find_blocks(state.model, state.plan, max_layers=2)
    assert [[n.op_type for n in b.nodes] for b in short] == [["Conv", "Relu"], ["Conv", "HardSwish", "Conv", "Relu"],
                                                            ["Conv"], ["Gemm"]]
    block = blocks[1]
    # the Add's output before its own Q: DQ(Q(c3)) + DQ(Q(a0)), the Add on both quantized inputs
    _runner_matches_onnxruntime(torch, state, block, data)
    seen = []
    edits, report = round_blocks(state, state.plan, Edits(), lambda *a: seen.append(a))
    assert report.layers == 5 and report.after < report.before and edits.weights
    # one bar (the stage before " · "), its note the blocks' error so far
    assert [a[1:] for a in seen] == [(1, 2), (2, 2)] and all(a[0].startswith("block reconstruction · block MSE -")
                                                            for a in seen)


def test_a_zero_pad_before_a_convolution_stays_inside_its_block(rng):
    """TF-style "same" padding (a Pad by constants, then a Conv without pads) is computed by the
    runner as the QDQ model computes it, so the block does not end there."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from edgequant.algorithms.blocks import find_blocks

    text = RESIDUAL.replace("    c2 = Conv <pads = [1, 1, 1, 1], group = 8> (r1, W2, B2)",
                            "    pp = Constant <value = int64[8] {0, 0, 2, 1, 0, 0, 0, 1}> ()\n"
                            "    q1 = Pad (r1, pp)\n"
                            "    c2 = Conv <group = 8> (q1, W2, B2)")
    m = _residual(rng, text)
    data = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(8)]
    state = calibrate(m, data, weight_dtype="int4", per_channel=False, eval_samples=2)
    blocks = find_blocks(state.model, state.plan, max_layers=3)
    block = blocks[1]
    assert [n.op_type for n in block.nodes] == ["Conv", "HardSwish", "Pad", "Conv", "Relu", "Conv", "Add"]
    _runner_matches_onnxruntime(torch, state, block, data)


def test_finetune_level_2_starts_its_blocks_from_gptq_and_keeps_it_unless_beaten(rng):
    """Level 2 runs on level 1: GPTQ rounds first, each block's learning starts at GPTQ's
    integers (its initial hard rounding is exactly them, a step up or down is a small move) and
    a block keeps them where it does not lower the block error."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from edgequant.algorithms.blocks import _Runner, find_blocks
    from edgequant.algorithms.stage import recover, round_weights
    from edgequant.transform.qdq import plain_weight, weight_key

    m = _residual(rng)
    data = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(16)]
    state = calibrate(m, data, weight_dtype="int4", per_channel=False, eval_samples=2, adaround_optim_steps=200)
    gptq, _ = round_weights(state, state.plan, Edits(), "gptq")
    block = find_blocks(state.model, state.plan, 4)[0]
    inits = {t.name: numpy_helper.to_array(t) for t in state.model.graph.initializer}
    weights = {n: (inits[wp.tensor], plain_weight(inits[wp.tensor], wp)[1]) for n, wp in block.weights.items()}
    start = {n: gptq.weights[weight_key(wp)][0] for n, wp in block.weights.items() if weight_key(wp) in gptq.weights}
    assert start
    runner = _Runner(torch, block, state.model, state.plan, state.params(state.plan), weights, {}, start)
    for n, q in start.items():
        np.testing.assert_array_equal(runner.integers(n, runner.v0[n]), q)
    state = dataclasses.replace(state, prepared=dataclasses.replace(state.prepared, options=dataclasses.replace(
        state.options, recovery=dataclasses.replace(state.options.recovery, finetune_level=2))))
    done = recover(state)
    assert [r.name for r in done.recovery] == ["GPTQ", "block reconstruction", "bias correction"]
    assert set(gptq.weights) <= set(done.edits.weights)  # every GPTQ choice kept or bettered, none back to nearest


def test_a_block_keeps_its_learned_rounding_only_where_held_out_samples_agree(rng, monkeypatch):
    """Every 4th sample is held out of a block's learning; a rounding that lowers the error on
    the samples it learned from but raises it on the held-out ones is not kept."""
    pytest.importorskip("torch").set_num_threads(1)
    from edgequant.algorithms import stage
    from edgequant.algorithms.blocks import BlockStats, reconstruct

    fit, held = stage.held_out_split(8)
    assert fit.tolist() == [0, 1, 2, 4, 5, 6] and held.tolist() == [3, 7]
    assert stage.held_out_split(7)[1].size == 0  # too few to hold any out
    m = _residual(rng)
    data = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(14)]
    state = calibrate(m, data, weight_dtype="int4", per_channel=False, eval_samples=2, adaround_optim_steps=60)
    seen = []

    def spy(*args, **kwargs):
        ints, stats = reconstruct(*args, **kwargs)
        seen.append((args[6].shape[0], kwargs["held"][0].shape[0], stats))
        assert stats.held_before is not None and stats.held_after is not None
        return ints, stats

    monkeypatch.setattr(stage, "reconstruct", spy)
    edits, report = stage.round_blocks(state, state.plan, Edits())
    assert seen and all((n_fit, n_held) == (9, 3) for n_fit, n_held, _ in seen)  # 12 calibration samples
    kept = [s.improved for _, _, s in seen]
    assert bool(edits.weights) == any(kept)

    def overfit(*args, **kwargs):  # better where it learned, worse on the held-out samples
        ints, stats = reconstruct(*args, **kwargs)
        return ints, BlockStats(1.0, 0.5, stats.seconds, stats.steps, stats.optim_steps, 1.0, 1.5)

    monkeypatch.setattr(stage, "reconstruct", overfit)
    edits, report = stage.round_blocks(state, state.plan, Edits())
    assert not edits.weights and not edits.ranges and report.after == report.before == 1.0
    assert "kept their first rounding: the learned one was worse on held-out samples" in report.detail
    assert BlockStats(1.0, 0.5, 0.0).improved and not BlockStats(1.0, 1.2, 0.0).improved


def test_a_time_budget_cuts_the_steps_of_a_block(rng):
    pytest.importorskip("torch").set_num_threads(1)
    from edgequant.algorithms.stage import round_blocks

    m = _residual(rng)
    data = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(12)]
    state = calibrate(m, data, weight_dtype="int4", per_channel=False, eval_samples=2, block_time_budget=1e-6)
    _, report = round_blocks(state, state.plan, Edits())
    assert report.detail.endswith("time budget 1e-06 s: 11–11 steps a block")
    with pytest.raises(edgequant.ConfigError, match="block_time_budget"):
        edgequant.make_options(block_time_budget=0)


def test_step_range_gives_back_the_step_and_zero_point():
    from edgequant.algorithms.stage import step_range
    from edgequant.quant.dtypes import QuantDType
    from edgequant.quant.params import compute_params

    assert step_range(compute_params(-1.0, 24.5, QuantDType.UINT8, False), False, 0.1) == pytest.approx((-1.0, 24.5))
    for dtype, sym, lo, hi in ((QuantDType.UINT8, False, -1.3, 7.0), (QuantDType.INT8, True, -2.0, 3.0),
                               (QuantDType.UINT8, True, -2.0, 3.0), (QuantDType.INT16, False, -5.0, 1.0)):
        p = compute_params(lo, hi, dtype, sym)
        back = compute_params(*step_range(p, sym, 0.037), dtype, sym)
        assert float(back.scale) == pytest.approx(0.037, rel=1e-6) and int(back.zero_point) == int(p.zero_point)


def test_block_reconstruction_learns_activation_steps_the_qdq_model_then_uses(rng):
    """Ranges stretched by one outlier sample (minmax) leave coarse steps inside the blocks;
    learning them with the rounding lowers the block error on held-out samples, and the
    assembled QDQ model quantizes those activations with the learned steps."""
    pytest.importorskip("torch").set_num_threads(1)
    from edgequant.algorithms.blocks import find_blocks, learnable_roots
    from edgequant.algorithms.stage import round_blocks

    m = _residual(rng)
    data = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(24)]
    data[0]["x"] *= 40.0  # one outlier sample: minmax ranges far too wide for the others
    state = calibrate(m, data, weight_dtype="int4", per_channel=False, method="minmax", eval_samples=4)
    blocks = find_blocks(state.model, state.plan, max_layers=3)
    names = {n.name: n.output[0] for n in state.model.graph.node}
    inside = learnable_roots(blocks[1], state.plan)
    # the HardSwish, depthwise-Relu and c3 outputs; not the block's input a0 (read by the skip) nor its output
    assert names[blocks[0].nodes[-1].name] not in inside and len(inside) >= 2
    assert not learnable_roots(blocks[2], state.plan)  # a single Gemm: nothing inside
    rec = state.options.recovery
    fixed = dataclasses.replace(state, prepared=dataclasses.replace(state.prepared, options=dataclasses.replace(
        state.options, recovery=dataclasses.replace(rec, block_learn_activations=False))))
    plain_edits, plain_report = round_blocks(fixed, state.plan, Edits())
    edits, report = round_blocks(state, state.plan, Edits())
    assert not plain_edits.ranges and edits.ranges and "activation step sizes learned" in report.detail
    assert report.after < 1.0 and plain_report.after < 1.0
    before, after = state.params(state.plan), state.params(state.plan, edits)
    changed = [r for r in after if float(after[r].scale) != float(before[r].scale)]
    assert changed and set(changed) <= {k[0] for k in edits.ranges}
    q = insert_qdq(state.model, state.plan, after, edits)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    scales = [float(inits[n.input[1]]) for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert all(any(abs(s - float(after[r].scale)) < 1e-9 for s in scales) for r in changed)


def _set(model, **values):
    for t in model.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(np.asarray(values[t.name], np.float32), t.name))


ENCODER = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16, 32] x) => (float[N, 16, 24] y) {
    n = LayerNormalization <axis = -1> (x, G, B)
    h = MatMul (n, W1)
    y = MatMul (h, W2)
}
"""


def test_smoothquant_through_quantize_flattens_the_outliers_and_lowers_the_error(rng):
    g = np.ones(32, np.float32)
    g[[3, 17]] = 40.0  # LayerNorm's scale makes outlier channels, as in transformers
    m = with_weights(ENCODER, rng, G=(32,), B=(32,), W1=(32, 48), W2=(48, 24))
    _set(m, G=g)
    data = [{"x": rng.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(40)]
    plain = edgequant.quantize(m, data, method="minmax")
    smooth = edgequant.quantize(m, data, method="minmax", smoothquant=0.5)
    step = smooth.summary.recovery[0]
    assert step.name.startswith("SmoothQuant") and step.layers == 2 and step.after < step.before / 3
    assert 1 - smooth.summary.fidelity[0].cosine < 0.5 * (1 - plain.summary.fidelity[0].cosine)
    x = data[-1]
    np.testing.assert_allclose(make_session(smooth.float_model).run(None, x)[0], make_session(m).run(None, x)[0],
                               rtol=1e-4, atol=1e-3)  # the rescaled float model computes the same


SKIP_READ = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16, 32] x) => (float[N, 16, 32] y) {
    h = MatMul (x, W1)
    y = Add (h, x)
}
"""


def test_smoothquant_with_an_inserted_mul_keeps_the_matmul_in_8_bits(rng):
    """The graph input is read by the Add too, so ``1/s`` goes into an inserted ``Mul``: its
    output is quantized like any activation, and the MatMul reads 8-bit operands (it read a
    float input when the inserted tensor had no type)."""
    m = with_weights(SKIP_READ, rng, W1=(32, 32))
    scale = np.ones(32, np.float32)
    scale[[5, 20]] = 30.0
    data = [{"x": (rng.standard_normal((1, 16, 32)) * scale).astype(np.float32)} for _ in range(24)]
    smooth = edgequant.quantize(m, data, smoothquant=0.5, repair=False)
    assert "1 Mul inserted" in smooth.summary.recovery[0].detail
    producers = {o: n for n in smooth.model.graph.node for o in n.output}
    matmul = next(n for n in smooth.model.graph.node if n.op_type == "MatMul")
    assert [producers[i].op_type for i in matmul.input] == ["DequantizeLinear", "DequantizeLinear"]
    eight, total = smooth.summary.eight_bit_macs
    assert eight == total > 0


RELU6 = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] x) => (float[N, 6, 8, 8] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    r1 = Clip (c1, lo, hi)
    y = Conv <pads = [1, 1, 1, 1]> (r1, W2, B2)
}
"""


def test_cle_through_relu6_checks_fidelity_against_the_original_model(rng):
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w1[0] *= 20.0  # one channel with a wide range: per-tensor weights lose the others
    m = with_weights(RELU6, rng, W1=(4, 3, 3, 3), B1=(4,), W2=(6, 4, 3, 3), B2=(6,), lo=(), hi=())
    _set(m, W1=w1, lo=np.float32(0), hi=np.float32(6))
    data = [{"x": v} for v in calib(rng, 30)]
    exact = calibrate(m, data, target="espdl-s3", cle=True, eval_samples=8)  # the default: bounded, exact
    assert exact.reference_model is None and "ReLU6 bounded per channel" in exact.recovery[0].detail
    assert [n.op_type for n in exact.model.graph.node] == ["Conv", "Relu", "Min", "Conv"]
    assert not exact.plan.float_ops  # the Min shares the Relu's parameters: no float op on the chip
    state = calibrate(m, data, target="espdl-s3", cle=True, cle_relu6="relu", eval_samples=8)
    assert state.reference_model is not None  # ReLU6 became Relu: references come from the original
    assert "ReLU6 → Relu" in state.recovery[0].detail
    assert [n.op_type for n in state.model.graph.node] == ["Conv", "Relu", "Conv"]
    assert [n.op_type for n in state.reference_model.graph.node] == ["Conv", "Clip", "Conv"]
    ref = state.references(*state.split.eval_range)[0]
    want = make_session(m).run(None, {"x": ref["x"]})[0]
    np.testing.assert_allclose(ref["y"], want, rtol=1e-5, atol=1e-5)


STRIDED = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, W] x) => (float[N, 6, 4, V] y) {
    c1 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, W1)
    r1 = Relu (c1)
    y = Conv <pads = [1, 1, 1, 1]> (r1, W2)
}
"""


def test_rounding_stages_take_samples_of_one_shape_when_widths_vary(rng):
    pytest.importorskip("torch")
    m = with_weights(STRIDED, rng, W1=(4, 3, 3, 3), W2=(6, 4, 3, 3))
    widths = [8] * 10 + [7] * 8 + [12] * 6  # 8 is the commonest input width; 7 and 8 both give output width 4
    data = [{"x": rng.standard_normal((1, 3, 8, w)).astype(np.float32)} for w in widths]
    for kw in ({"finetune_level": 2, "adaround_optim_steps": 50}, {"gptq": True}):
        r = edgequant.quantize(m, data, weight_dtype="int4", float_narrow_convs=0, **kw)
        assert r.summary.recovery[0].layers == 2 and r.summary.fidelity[0].cosine > 0.9


BI_LSTM = """
<ir_version: 8, opset_import: ["" : 14]>
g (float[N, T, 12] x) => (float[T, 2, N, 16] y) {
    t = Transpose <perm = [1, 0, 2]> (x)
    a = MatMul (t, M)
    y = LSTM <hidden_size = 16, direction = "bidirectional"> (a, W, R, B)
}
"""


def test_gptq_rounds_recurrent_weights_and_lowers_the_held_out_error(rng):
    model = with_weights(BI_LSTM, rng, M=(12, 16), W=(2, 64, 16), R=(2, 64, 16), B=(2, 128))
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 0.4, t.name))
    mix = rng.standard_normal((12, 12)).astype(np.float32) * np.exp(-np.arange(12) / 3).astype(np.float32)

    def sequences(n, seed):
        r = np.random.default_rng(seed)
        return [{"x": (r.standard_normal((1, int(r.integers(6, 12)), 12)) @ mix).astype(np.float32)} for _ in range(n)]

    calib_data, held_out = sequences(48, 1), sequences(24, 2)
    plain = edgequant.quantize(model, calib_data, weight_dtype="int4", eval_samples=0, repair=False)
    gptq = edgequant.quantize(model, calib_data, weight_dtype="int4", gptq=True, eval_samples=0, repair=False)
    assert gptq.summary.recovery[0].layers == 2  # the MatMul and the LSTM (W and R)
    ints = {t.name: numpy_helper.to_array(t) for t in gptq.model.graph.initializer}
    plain_ints = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    cell = next(n for n in gptq.model.graph.node if n.op_type == "LSTM")
    producer = {o: n for n in gptq.model.graph.node for o in n.output}
    for slot in (1, 2):
        q_name = producer[cell.input[slot]].input[0]
        assert ints[q_name].shape == (2, 64, 16) and not np.array_equal(ints[q_name], plain_ints[q_name])

    def error(q):
        f_sess, q_sess = make_session(model, ["y"]), make_session(q, ["y"])
        return float(np.mean([np.mean((q_sess.run(["y"], f)[0] - f_sess.run(["y"], f)[0]) ** 2) for f in held_out]))

    assert error(gptq.model) < 0.8 * error(plain.model)


def test_recurrent_rows_follow_each_direction_and_the_layout():
    from onnx import helper

    from edgequant.algorithms.stage import _recurrent_rows

    y = np.arange(3 * 2 * 1 * 2, dtype=np.float32).reshape(3, 2, 1, 2)  # [T, D, B, H]
    x = np.arange(3 * 1 * 4, dtype=np.float32).reshape(3, 1, 4)
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], direction="bidirectional")
    np.testing.assert_array_equal(_recurrent_rows(node, 1, [x], [y], 1), x.reshape(3, 4))
    np.testing.assert_array_equal(_recurrent_rows(node, 2, [x], [y], 0), y[:2, 0, 0])  # h₀, h₁ feed steps 1, 2
    np.testing.assert_array_equal(_recurrent_rows(node, 2, [x], [y], 1), y[1:, 1, 0])  # reverse: h₂, h₁
    batch_first = helper.make_node("LSTM", ["x", "W", "R"], ["y"], direction="bidirectional", layout=1)
    np.testing.assert_array_equal(_recurrent_rows(batch_first, 2, [x], [y.transpose(2, 0, 1, 3)], 1), y[1:, 1, 0])

