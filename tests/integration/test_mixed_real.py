"""Mixed precision on real models that int8 breaks.

* magika (integer input, layer norms, GELU): plain int8 breaks it (73 % top-1 on 172 held-out
  files against 98.8 % float); the collapse guard must fire and name its LayerNorm ops;
  ``--auto-mixed`` with defaults must bring it back within a point with a tiny share of MACs
  in 16-bit; the override file it writes must reproduce the same model; plain ``quantize``
  (the default repair) must come within 3 points of float.
* silero-vad (STFT, convolutions, an LSTM whose state streams from chunk to chunk): plain int8
  loses 7 points of voice-activity accuracy on real speech in noise; ``--auto-mixed`` with
  defaults must win them back within the MAC budget.
* PP-OCRv4's text-line recognizer (convolutions, then SVTR transformer blocks with attention
  and layer norms; CTC output): int8 loses about ten points of exact-line accuracy; its
  decisions (one class per frame) are what ``--auto-mixed`` must keep.
"""

import json
import random
import subprocess
import sys
import zipfile

import numpy as np

import edgequant
from edgequant.mixed.search import auto_mixed
from tests.conftest import extract, session, wheel_path
from tests.integration.realdata import (
    ctc_decode,
    labelled_files,
    ppocr_charset,
    text_lines,
    vad_calibration,
    vad_scenes,
    vad_stream,
)

MODEL = ("magika", "magika/models/standard_v3_3/model.onnx")


def labels() -> list[str]:
    with zipfile.ZipFile(wheel_path("magika")) as z:
        return json.loads(z.read("magika/models/standard_v3_3/config.min.json"))["target_labels_space"]


def calibration():
    data = [{"bytes": x} for _, x in labelled_files(40, part=0, seed=0)]  # a sample of every size
    random.Random(0).shuffle(data)  # held-out samples are the last ones: mix the file kinds
    return data


def accuracy(model, test, names) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return float(np.mean([names[int(sess.run(None, {"bytes": x})[0].argmax())] == y for y, x in test]))


def test_guard_fires_and_auto_mixed_restores_magika():
    model, names, test = extract(*MODEL), labels(), labelled_files(150, part=1)  # 172 files
    data = calibration()
    int8 = edgequant.quantize(str(model), data, repair=False)
    assert int8.summary.collapse is not None and not int8.summary.repair
    assert int8.summary.collapse.cosine < 0.8 and "--override" in int8.summary.collapse.advice()
    assert all("LayerNorm" in n for n in int8.summary.collapse.layers[:3])
    result, mixed = auto_mixed(str(model), data)
    assert mixed.reached and 0 < len(mixed.overrides) <= 32 and mixed.cost <= 0.01  # 28 layers, 0.3 % of MACs
    assert result.summary.collapse is None
    repaired = edgequant.quantize(str(model), data)  # the default: repaired before it is returned
    assert repaired.summary.collapse is None and "broken" in repaired.summary.repair[0]
    assert "mixed-precision" in repaired.summary.repair[-1] and repaired.summary.precision
    float_acc, int8_acc, mixed_acc, repaired_acc = (accuracy(m, test, names) for m in (
        int8.float_model, int8.model, result.model, repaired.model))
    print(f"float {float_acc:.4f} int8 {int8_acc:.4f} auto-mixed {mixed_acc:.4f} default {repaired_acc:.4f}",
          mixed.describe(), repaired.summary.repair)
    assert float_acc > 0.98 and int8_acc < float_acc - 0.2
    assert mixed_acc >= float_acc - 0.01, (mixed_acc, mixed.overrides)
    assert repaired_acc >= float_acc - 0.03, repaired.summary.repair


def test_cli_strict_auto_mixed_and_override_file(tmp_path):
    model = extract(*MODEL)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feed in enumerate(calibration()):  # 64 files, 12 held out: int8's cosine 0.73 there
        np.savez(calib / f"{i:03d}.npz", **feed)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edgequant", "quantize", str(model), "--calib", str(calib),
                               "-q", *map(str, args)], capture_output=True, text=True, timeout=600)

    strict = cli("-o", tmp_path / "a.onnx", "--strict", "--no-repair")
    assert strict.returncode == 3 and "collapsed" in strict.stderr and "--override" in strict.stderr
    plain = cli("-o", tmp_path / "b.onnx", "--no-repair")  # without --strict: a warning only
    assert plain.returncode == 0 and "collapsed" in plain.stderr
    repaired = cli("-o", tmp_path / "d.onnx", "--strict")  # repaired: nothing left to fail on
    assert repaired.returncode == 0 and "collapsed" not in repaired.stderr, repaired.stderr
    assert (tmp_path / "d.onnx").read_bytes() != (tmp_path / "b.onnx").read_bytes()
    mixed = cli("-o", tmp_path / "m.onnx", "--auto-mixed", "--strict")
    assert mixed.returncode == 0, mixed.stderr
    override_file = tmp_path / "m.mixed.yaml"
    assert override_file.is_file() and (tmp_path / "m.mixed.png").is_file()
    again = cli("-o", tmp_path / "r.onnx", "--override-file", override_file)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "r.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    bad = cli("-o", tmp_path / "x.onnx", "--auto-mixed", "--max-high-precision", "200%")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and not (tmp_path / "x.onnx").exists()


def test_auto_mixed_on_a_task_metric():
    model, names = extract(*MODEL), labels()
    data = calibration()
    dev = labelled_files(40, part=0)[::2]  # labelled files the user holds out for the search

    def metric(m):
        return accuracy(m, dev, names)

    result, mixed = auto_mixed(str(model), data, metric=metric, metric_tolerance=0.0)
    assert mixed.measure == "metric" and mixed.target == 1.0
    assert mixed.reached and mixed.score == 1.0 and mixed.cost <= 0.10
    assert accuracy(result.model, dev, names) == 1.0


def vad_accuracy(model, scenes) -> float:
    sess = session(model)
    return float(np.mean(np.concatenate([(vad_stream(sess, x) > 0.5) == y for x, y in scenes])))


def test_auto_mixed_restores_the_streaming_voice_activity_lstm():
    model = extract("silero_vad", "silero_vad/data/silero_vad_openvino_16k.onnx")
    data = vad_calibration(model)[::6]
    test = vad_scenes(40, seed=7)
    int8 = edgequant.quantize(str(model), data, repair=False)
    assert int8.summary.collapse is not None and int8.summary.quantized_ops["LSTM"] == 1
    result, mixed = auto_mixed(str(model), data)
    assert mixed.cost <= 0.10 and any(o.precision == "float" for o in mixed.overrides)  # power spectrum
    float_acc, int8_acc, mixed_acc = (vad_accuracy(m, test) for m in (int8.float_model, int8.model, result.model))
    int16 = edgequant.quantize(str(model), data, activation_dtype="int16")
    int16_acc = vad_accuracy(int16.model, test)
    print(f"float {float_acc:.4f} int8 {int8_acc:.4f} auto-mixed {mixed_acc:.4f} int16 {int16_acc:.4f}", mixed.describe())
    assert 0.90 < float_acc and int8_acc < float_acc - 0.04
    assert mixed_acc >= float_acc - 0.01, mixed.describe()
    assert int16_acc >= float_acc - 0.005


def test_the_default_repair_restores_the_ppocr_transformer_recognizer():
    import onnx

    model = extract("rapidocr_onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")
    charset = ppocr_charset(onnx.load(str(model)))
    data = [x for _, x in text_lines(48, seed=1)]
    test = text_lines(400, seed=3)

    def line_accuracy(m) -> float:
        sess = session(m)
        return float(np.mean([ctc_decode(sess.run(None, {"x": x})[0][0], charset) == t for t, x in test]))

    int8 = edgequant.quantize(str(model), data, repair=False)
    # the guard judges decoded lines; the repair's minmax step reads too few held-out lines as
    # float does here, so it keeps its mixed-precision search (auto_mixed's defaults)
    default = edgequant.quantize(str(model), data)
    float_acc, int8_acc, default_acc = (line_accuracy(m) for m in (int8.float_model, int8.model, default.model))
    print(f"float {float_acc:.4f} int8 {int8_acc:.4f} default {default_acc:.4f}", default.summary.repair)
    assert float_acc > 0.9 and int8_acc < float_acc - 0.05
    assert "decode to another sequence" in int8.summary.collapse.reason
    mixed = next(line for line in default.summary.repair if line.startswith("mixed precision: "))
    assert "cosine, samples keeping their decisions" in mixed
    assert default.summary.repair[-1].startswith("kept: the mixed-precision result")
    eight, macs = default.summary.eight_bit_macs
    assert default.summary.precision and 1 - eight / macs <= 0.10
    assert default.summary.collapse is None and default_acc >= float_acc - 0.01, default.summary.repair


def test_auto_mixed_on_the_standard_silero_export_whose_lstm_sits_in_if_bodies():
    """Kept as control flow (``specialize=False``), its compute stays in If bodies; models
    assembled during the search used to reuse a body's name at the top level (onnxruntime:
    "Graph must be in single static assignment (SSA) form")."""
    import onnx

    model = extract("silero_vad", "silero_vad/data/silero_vad_16k_op15.onnx")
    carried = vad_calibration(extract("silero_vad", "silero_vad/data/silero_vad_openvino_16k.onnx"))[::24]
    data = [{"input": f["input"], "state": f["state"], "sr": np.array(16000, np.int64)} for f in carried]
    result, mixed = auto_mixed(str(model), data, specialize=False)
    onnx.checker.check_model(result.model, full_check=True)
    assert any(n.op_type == "If" for n in result.model.graph.node) and mixed.steps
    assert result.summary.quantized_ops["LSTM"] == 1  # inside the If's branch
    assert min(f.cosine for f in result.summary.fidelity) > 0.99


class _WithRate:
    """The standard silero export's interface: the 576-sample window, the state, and ``sr``."""

    def __init__(self, sess):
        self.sess = sess

    def run(self, names, feed):
        return self.sess.run(None, {**feed, "sr": np.array(16000, np.int64)})


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels.astype(bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _scenes_auc():
    scenes = vad_scenes(40, seed=7)
    labels = np.concatenate([y for _, y in scenes])

    def auc(m) -> float:
        sess = _WithRate(session(m))
        return _auc(np.concatenate([vad_stream(sess, x) for x, _ in scenes]), labels)
    return auc


def test_the_if_branches_the_standard_silero_export_keeps_are_quantized_lstm_included():
    """Kept as control flow (``specialize=False``): If(sr == 16000) wraps the whole model, with
    shape tests nested inside. Each branch the calibration samples take is quantized as a model
    of its own (and repaired there: its power spectrum breaks at plain int8)."""
    import onnx

    model = extract("silero_vad", "silero_vad/data/silero_vad.onnx")
    feeds = vad_calibration(extract("silero_vad", "silero_vad/data/silero_vad_openvino_16k.onnx"))[::6]
    data = [{**f, "sr": np.array(16000, np.int64)} for f in feeds]
    result = edgequant.quantize(str(model), data, specialize=False)
    onnx.checker.check_model(result.model, full_check=True)
    assert [n.op_type for n in result.model.graph.node].count("If") == 1
    s = result.summary
    assert s.quantized_ops["LSTM"] == 1 and s.collapse is None
    assert any(n.startswith("If If_0: then branch quantized on the") and "repair kept" in n for n in s.notes), s.notes
    assert any("its else branch" in n and "taken by no calibration sample" in n for n in s.notes)  # sr 8000
    eight, total = s.eight_bit_macs
    assert eight >= 0.9 * total
    auc = _scenes_auc()
    float_auc, q_auc = auc(onnx.load(str(model))), auc(result.model)
    print(f"AUC float {float_auc:.4f} If kept {q_auc:.4f}; 8-bit MACs {eight / total:.3f}", s.notes)
    assert float_auc > 0.95 and q_auc >= float_auc - 0.02


def test_the_defaults_fold_the_standard_silero_export_flat_and_quantize_its_lstm():
    """silero-vad's standard export wraps the whole model in If(sr == 16000), with shape tests
    ("is the batch 1?", "is the state empty?") nested inside. At the calibration data's shapes
    and sample rate the defaults fold all of them away, quantize the LSTM with the rest, and
    repair what plain int8 breaks (its power spectrum)."""
    import onnx

    model = extract("silero_vad", "silero_vad/data/silero_vad.onnx")
    feeds = vad_calibration(extract("silero_vad", "silero_vad/data/silero_vad_openvino_16k.onnx"))[::6]
    data = [{**f, "sr": np.array(16000, np.int64)} for f in feeds]
    result = edgequant.quantize(str(model), data)
    onnx.checker.check_model(result.model, full_check=True)
    assert not any(n.op_type in ("If", "Loop", "Scan") for n in result.model.graph.node)
    assert result.summary.subgraph_float_ops == 0 and result.summary.quantized_ops["LSTM"] == 1
    assert any(n.startswith("specialized at input=1x576, state=2x1x128, sr=16000") for n in result.summary.notes)
    eight, total = result.summary.eight_bit_macs
    assert eight >= 0.9 * total, result.summary.repair
    auc = _scenes_auc()
    float_auc, q_auc = auc(onnx.load(str(model))), auc(result.model)
    print(f"AUC float {float_auc:.4f} default {q_auc:.4f}; 8-bit MACs {eight / total:.3f}", result.summary.repair)
    assert float_auc > 0.95 and q_auc >= float_auc - 0.02
