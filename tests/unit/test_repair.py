"""The guard's verdict (cosine, decisions, flipped scores) and the default repair of a broken result."""

import numpy as np
import pytest
from onnx import numpy_helper

import edgequant
from edgequant.analysis.metrics import DecisionTally, blank_class, decoded
from edgequant.mixed.guard import (
    DECISION_FLOOR,
    FLIP_CEILING,
    MIN_FLIPPED,
    ROW_FLIP_CEILING,
    SEQUENCE_FLOOR,
    judge,
)
from edgequant.mixed.repair import better, fallback_for, health
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
    # a CTC recognizer is judged by what it reads, not frame by frame
    reads = OutputFidelity("ctc", 0.96, 15.0, decisions=0.12, row_flips=0.042, sequences=1.0)
    assert judge([reads], 0.9) == ""
    misreads = OutputFidelity("ctc", 0.97, 15.0, decisions=0.19, row_flips=0.037, sequences=15 / 16)
    assert "6% of held-out samples decode to another sequence" in judge([misreads], 0.9)
    assert judge([OutputFidelity("ctc", 0.97, 15.0, decisions=0.0, row_flips=0.5, sequences=SEQUENCE_FLOOR)], 0.9) == ""
    assert health([misreads]) < health([reads])  # the repair prefers the model that reads as float does


def _frames(classes, blank=0, c=5, sure=0.9):
    """[1, T, c] probabilities whose top-1 per frame is ``classes``."""
    p = np.full((1, len(classes), c), (1 - sure) / (c - 1), np.float32)
    p[0, np.arange(len(classes)), classes] = sure
    return p


def test_sequences_are_compared_as_a_greedy_ctc_decoder_reads_them():
    ref = _frames([0, 1, 1, 0, 2, 0, 0, 2, 0])  # reads 1 2 2
    assert blank_class(ref) == 0 and decoded(ref, 0) == (1, 2, 2)
    shifted = _frames([0, 0, 1, 0, 2, 2, 0, 2, 0])  # two frames flip at character boundaries
    merged = _frames([0, 1, 1, 0, 2, 2, 2, 2, 0])  # the blank between the two 2s is lost: reads 1 2
    swapped = _frames([0, 1, 1, 0, 3, 0, 0, 2, 0])  # a character misread
    t = DecisionTally()
    for got in (ref, shifted, merged, swapped):
        t.update(ref, got)
    assert t.sequences == 0.5 and t.decisions == 0.25  # frame by frame, only the identical one agrees
    last = _frames([4, 1, 4, 4, 2, 4])  # TensorFlow's convention: the blank is the last class
    assert blank_class(last) == 4 and decoded(last, 4) == (1, 2)
    assert blank_class(_frames([1, 2, 3])) is None and decoded(_frames([1, 1, 2, 3]), None) == (1, 2, 3)
    single = DecisionTally()
    single.update(_frames([1])[0], _frames([2])[0])  # one row per sample: a classifier, not a sequence
    assert single.sequences is None and single.decisions == 0.0


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
    lines = fixed.summary.repair  # per-channel int8 weights: unclipped ranges, then mixed precision
    assert "broken" in lines[0] and "ranges by minmax" in lines[1] and "guard quiet" not in lines[1], lines
    assert "mixed precision" in lines[2] and len(lines) == 4, lines
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


# one token's channel carries a value 200× the rest (an attention sink): 1 value in 16384, so the
# 99.99th percentile clips it, and the output row it feeds is lost; minmax keeps it
SINK = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 64, 256] x) => (float[1, 64, 8] y) {
    y = MatMul (x, W)
}
"""


def test_the_repair_tries_unclipped_ranges_before_leaving_8_bits():
    m = parse(SINK, check=False)
    m.graph.initializer.append(numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32), "W"))
    rng = np.random.default_rng(1)
    data = [rng.standard_normal((1, 64, 256)).astype(np.float32) for _ in range(40)]
    for x in data:
        x[0, 0, 0] = 200.0
    plain = edgequant.quantize(m, data, repair=False)
    assert plain.summary.collapse is not None and plain.summary.fidelity[0].cosine < 0.8
    fixed = edgequant.quantize(m, data)
    lines = fixed.summary.repair
    assert "ranges by minmax" in lines[1] and "guard quiet" in lines[1], lines
    assert "kept: the minmax-calibrated result" in lines[-1] and len(lines) == 3, lines
    assert fixed.summary.collapse is None and fixed.summary.fidelity[0].cosine > 0.98
    assert not fixed.summary.precision and fixed.options.method.value == "minmax"  # all 8-bit, and says how
    assert fixed.model.SerializeToString() == edgequant.quantize(m, data).model.SerializeToString()
    assert edgequant.quantize(m, data, method="minmax", repair=False).model.SerializeToString() == \
        fixed.model.SerializeToString()  # exactly the model minmax calibration gives


def test_at_equal_decisions_the_all_eight_bit_result_wins_where_its_cosine_clears_the_floor():
    from types import SimpleNamespace

    def result(cosine, decoded, eight, seq=True):
        f = OutputFidelity("y", cosine, 20.0, decisions=decoded, sequences=decoded if seq else None)
        return SimpleNamespace(summary=SimpleNamespace(fidelity=[f], eight_bit_macs=(eight, 100)))

    minmax, mixed = result(0.972, 10 / 12, 100), result(0.986, 10 / 12, 90)
    assert better(minmax, mixed, 0.9) and not better(mixed, minmax, 0.9)
    assert better(mixed, result(0.972, 9 / 12, 100), 0.9)  # more decisions kept: whatever the cost
    broken = result(0.85, 1.0, 100, seq=False)  # decisions kept, cosine below the floor: the fix wins
    assert better(result(0.99, 1.0, 90, seq=False), broken, 0.9) and not better(broken, result(0.99, 1.0, 90), 0.9)
    # a result the guard passes beats a broken one whatever its decisions: one flipped score
    # (too few for the guard) at cosine 0.988 against every score kept at cosine 0.791
    flipped = SimpleNamespace(summary=SimpleNamespace(eight_bit_macs=(90, 100), fidelity=[
        OutputFidelity("landmarks", 0.988, 15.0), OutputFidelity("score", 0.996, 20.0, flips=0.053, flipped=1)]))
    kept = SimpleNamespace(summary=SimpleNamespace(eight_bit_macs=(100, 100), fidelity=[
        OutputFidelity("landmarks", 0.791, 2.5), OutputFidelity("score", 0.996, 20.0, flips=0.0, flipped=0)]))
    assert better(flipped, kept, 0.9) and not better(kept, flipped, 0.9)
    assert not better(flipped, kept, 0.7)  # both pass a floor of 0.7: the decisions decide again
    plain = SimpleNamespace(summary=SimpleNamespace(fidelity=[OutputFidelity("y", 0.8, 5.0)], eight_bit_macs=(100, 100)))
    assert better(SimpleNamespace(summary=SimpleNamespace(fidelity=[OutputFidelity("y", 0.95, 9.0)],
                                                          eight_bit_macs=(90, 100))), plain, 0.9)  # no decisions: cosine
