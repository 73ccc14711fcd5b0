"""The guard's verdict (cosine, decisions, flipped scores) and the default repair of a broken result."""

import numpy as np
import pytest
from onnx import numpy_helper

import edgequant
from edgequant.analysis.metrics import DecisionTally
from edgequant.mixed.guard import DECISION_FLOOR, FLIP_CEILING, MIN_FLIPPED, ROW_FLIP_CEILING, judge
from edgequant.mixed.repair import fallback_for, health
from edgequant.result import OutputFidelity
from tests.conftest import parse

# a layer-norm-like centring behind a large bias: b = xW + 1000, c = b − mean(b), y = cV. The
# signal in b (±1) is 0.1 % of its range, so 8-bit b loses it (step ≈ 4) while 16-bit keeps it
# (step ≈ 0.015): a collapse that bias correction cannot fix and mixed precision can
CENTRED = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 16] x) => (float[N, 8] y) {
    a = MatMul (x, W)
    b = Add (a, B)
    m = ReduceMean <axes = [1]> (b)
    c = Sub (b, m)
"""
OFFSET = CENTRED + """    y = MatMul (c, V)
}
"""


def offset_model(text: str = OFFSET):
    rng = np.random.default_rng(0)
    m = parse(text, check=False)
    m.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.1, "W"),
        numpy_helper.from_array(np.full(16, 1000, np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "V")])
    if "Eps" in text:
        m.graph.initializer.append(numpy_helper.from_array(np.array(1e-5, np.float32), "Eps"))
    return m


def offset_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(n)]


def test_judge_names_the_broken_output_and_stays_quiet_on_healthy_ones():
    ok = OutputFidelity("y", 0.999, 30.0, decisions=1.0)
    assert judge([ok], 0.9) == ""
    assert "cosine 0.500 < 0.9" in judge([ok, OutputFidelity("z", 0.5, 1.0)], 0.9)
    assert "cosine nan" in judge([OutputFidelity("z", float("nan"), float("nan"))], 0.9)  # NaN is broken
    assert judge([OutputFidelity("z", 0.5, 1.0)], 0.0) == ""  # collapse_cosine 0: guard off
    misread = OutputFidelity("p", 0.97, 20.0, decisions=DECISION_FLOOR - 0.05, row_flips=0.033)
    assert "keep their top-1 decisions" in judge([misread], 0.9)
    boundary = OutputFidelity("p", 0.99, 20.0, decisions=0.56, row_flips=ROW_FLIP_CEILING / 2)
    assert judge([boundary], 0.9) == ""  # many samples, each with a rare flip: decoding forgives it
    flips = OutputFidelity("s", 0.95, 15.0, flips=FLIP_CEILING + 0.01, flipped=MIN_FLIPPED)
    assert "cross 0.5" in judge([flips], 0.9)
    assert judge([OutputFidelity("s", 0.95, 15.0, flips=FLIP_CEILING / 2, flipped=10)], 0.9) == ""
    assert judge([OutputFidelity("s", 0.95, 15.0, flips=0.5, flipped=MIN_FLIPPED - 1)], 0.9) == ""  # too few
    assert health([misread]) < health([ok]) and health([flips]) < health([ok])


def test_decision_tally_counts_kept_decisions_and_flipped_scores():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.85, 0.05]], np.float32)
    t = DecisionTally()
    t.update(probs, probs + 0.01)
    t.update(probs, probs[:, [1, 0, 2]])  # both rows flip
    assert t.decisions == 0.5 and t.flips is None and t.row_flips == 0.5
    scores = np.array([0.9, 0.1, 0.55, 0.8], np.float32)  # 0.55 is not confident
    s = DecisionTally()
    s.update(scores, np.array([0.9, 0.6, 0.3, 0.8], np.float32))  # tp 2, fp 1: 1 − F1 = 1/5
    assert s.flips == pytest.approx(1 / 5) and s.flipped == 1 and s.decisions is None
    sparse = np.zeros(1000, np.float32)
    sparse[:4] = 0.9  # four notes in a sea of confident zeros: losing one is 1 − F1 = 1/7, not 0.1 %
    lost = sparse.copy()
    lost[0] = 0.2
    t = DecisionTally()
    t.update(sparse, lost)
    assert t.flips == pytest.approx(1 / 7)
    logits = DecisionTally()
    logits.update(np.array([3.0, -1.0], np.float32), np.array([-1.0, 3.0], np.float32))
    assert logits.decisions is None and logits.flips is None  # raw scores decide nothing we can judge


def test_the_default_repairs_a_collapse_with_the_fallback_the_target_allows():
    model, data = offset_model(), offset_data()
    plain = edgequant.quantize(model, data, repair=False)
    assert plain.summary.collapse is not None and not plain.summary.repair
    fixed = edgequant.quantize(model, data)
    assert fixed.summary.collapse is None and plain.summary.collapse.cosine < 0.9 < fixed.summary.fidelity[0].cosine
    lines = fixed.summary.repair  # per-channel int8 weights: straight to mixed precision
    assert "broken" in lines[0] and "mixed precision" in lines[1] and len(lines) == 3, lines
    assert "kept: the mixed-precision result" in lines[-1]
    assert fixed.summary.precision == {"Sub_3": "float"}  # onnxruntime: float kernels beat 16-bit ones
    npu = edgequant.quantize(model, data, target="acuity-perchannel")  # an NPU runs int16 natively
    assert npu.summary.collapse is None and set(npu.summary.precision.values()) == {"int16,int16"}
    tpu = edgequant.quantize(model, data, target="tpu-mlir")  # TPU-MLIR has no int16 mode: float
    assert tpu.summary.collapse is None and set(tpu.summary.precision.values()) == {"float"}
    again = edgequant.quantize(model, data)
    assert again.model.SerializeToString() == fixed.model.SerializeToString()  # same inputs, same bytes
    coarse = edgequant.quantize(model, data, per_channel=False).summary.repair  # rounding may be to blame
    assert "recovery (CLE, bias correction)" in coarse[1] and "mixed precision" in coarse[2], coarse


def test_a_target_without_fallbacks_keeps_the_best_it_can_in_8_bits(monkeypatch):
    import dataclasses

    from edgequant.mixed import repair as module
    from edgequant.targets import get_target

    assert fallback_for("generic") == "float" and fallback_for("espdl") == "int16" and fallback_for("tpu-mlir") == "float"
    bare = dataclasses.replace(get_target("generic"), fallback=())
    monkeypatch.setattr(module, "get_target", lambda name: bare)
    assert fallback_for("generic") is None
    r = edgequant.quantize(offset_model(), offset_data())
    assert "no mixed-precision search" in r.summary.repair[2] and not r.summary.precision
    assert r.summary.collapse is not None and r.summary.collapse.layers  # still broken: named, and warned


def test_the_repair_adds_no_recovery_the_requested_parameter_files_cannot_describe():
    from edgequant.export import check_exportable, exportable_recovery
    from edgequant.planning.options import Recovery

    full = Recovery(cle=True, bias_correction="empirical", gptq=True)
    assert exportable_recovery(full, ()) == full
    for fmt in ("qparams", "cali-table", "acuity", "edgequant"):
        check_exportable(fmt, exportable_recovery(full, (fmt,)))  # no ConfigError
    assert exportable_recovery(full, ("qparams",)).bias == "empirical"  # ranges-only files: rounding stays
    assert not exportable_recovery(full, ("qparams", "edgequant"))
    r = edgequant.quantize(offset_model(), offset_data(), per_channel=False, exports=("edgequant",))
    assert "recovery (nothing applies)" in r.summary.repair[1] and not r.summary.recovery


def test_eight_bit_macs_count_only_ops_whose_operands_both_arrive_8_bit():
    model, data = offset_model(), offset_data()
    plain = edgequant.quantize(model, data, repair=False)
    eight, total = plain.summary.eight_bit_macs
    assert total == 16 * 16 + 16 * 8 and eight == total  # two MatMuls, 8-bit in and 8-bit weights
    fixed = edgequant.quantize(model, data)  # the repair keeps Sub float: no MatMul reads its inputs
    assert fixed.summary.precision == {"Sub_3": "float"}
    assert fixed.summary.eight_bit_macs == (total, total)
    wide = edgequant.quantize(model, data, overrides=["Sub_3=int16", "MatMul_4=int16"], repair=False)
    assert wide.summary.eight_bit_macs == (16 * 16, total)  # the last MatMul now reads 16 bits


LAYER_NORM = CENTRED + """    s = Mul (c, c)
    v = ReduceMean <axes = [1]> (s)
    e = Add (v, Eps)
    r = Sqrt (e)
    n = Div (c, r)
    y = MatMul (n, V)
}
"""


def test_protect_statistics_keeps_decomposed_layer_norm_statistics_out_of_8_bits_from_the_start():
    m = offset_model(LAYER_NORM)
    data = offset_data()
    r = edgequant.quantize(m, data, repair=False, protect_statistics=True)
    assert r.summary.collapse is None and r.summary.fidelity[0].cosine > 0.99
    assert set(r.summary.precision.values()) == {"float"} and "Sub_3" in r.summary.precision
    assert "Div_8" not in r.summary.precision  # the normalised output stays 8-bit
    assert any(n.startswith("kept in float from the start") for n in r.summary.notes)
    plain = edgequant.quantize(m, data, repair=False)  # the default: left to the repair
    assert plain.summary.collapse is not None and not plain.summary.precision
    npu = edgequant.quantize(m, data, repair=False, target="acuity-perchannel", protect_statistics=True)
    assert set(npu.summary.precision.values()) == {"int16"}
    user = edgequant.quantize(m, data, repair=False, overrides=["Sub_3=int16"], protect_statistics=True)
    assert user.summary.precision["Sub_3"] == "int16"
    healthy = edgequant.quantize(offset_model(), data, repair=False, protect_statistics=True)  # no statistics
    assert not healthy.summary.precision and not any("from the start" in n for n in healthy.summary.notes)
