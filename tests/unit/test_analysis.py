"""Error analysis: metrics against numpy formulas, the QDQ map, graphwise and layerwise views
checked against an independent numpy computation, compare, dumps and report files."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgequant
from edgequant.analysis.compare import compare_dumps, parse_tolerance
from edgequant.analysis.metrics import FidelityAccumulator, compare
from edgequant.analysis.qdq_map import read_quant_map
from edgequant.data.npz import load_npz, save_npz
from edgequant.errors import ConfigError
from edgequant.planning.overrides import Override
from tests.conftest import parse
from tests.unit.test_quantize_graphs import calib, cnn

CHAIN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 16] x) => (float[N, 8] y) {
    h = MatMul (x, W1)
    y = MatMul (h, W2)
}
"""


def chain(rng):
    m = parse(CHAIN, check=False)
    m.graph.initializer.extend([numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W1"),
                                numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "W2")])
    return m


def test_metrics_match_their_formulas(rng):
    r = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2)]
    t = [x + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for x in r]
    acc = FidelityAccumulator()
    for a, b in zip(r, t):
        acc.update(a, b)
    m = acc.metrics()
    R, T = np.concatenate([x.ravel() for x in r]).astype(np.float64), np.concatenate([x.ravel() for x in t])
    noise, signal = np.sum((R - T) ** 2), np.sum(R**2)
    assert m.snr == pytest.approx(noise / signal, rel=1e-5)
    assert m.sqnr_db == pytest.approx(10 * np.log10(signal / noise), rel=1e-5)
    assert m.cosine == pytest.approx(R @ T / np.linalg.norm(R) / np.linalg.norm(T), rel=1e-6)
    assert m.euclidean == pytest.approx(1 - np.linalg.norm(R - T) / np.linalg.norm((R + T) / 2), rel=1e-5)
    assert m.mse == pytest.approx(noise / R.size, rel=1e-5)
    assert m.max_abs == pytest.approx(np.abs(R - T).max(), rel=1e-6)
    assert m.snr < 0.1 and not m.flagged
    same = compare(r[0], r[0])
    assert same.snr == 0 and same.cosine == pytest.approx(1) and same.euclidean == 1 and same.max_abs == 0
    bad = compare(np.ones(4, np.float32), np.array([1, np.inf, 1, np.nan], np.float32))
    assert bad.nonfinite == 2 and bad.flagged and bad.cosine == pytest.approx(1)
    huge = compare(np.float32(1e30) * r[0], np.float32(1e30) * t[0])  # float32 squares overflow: float64
    assert huge.cosine == pytest.approx(compare(r[0], t[0]).cosine, rel=1e-5)
    assert compare(np.ones(4, np.float32), -np.ones(4, np.float32)).flagged


def test_quant_map_reads_edgequant_and_onnxruntime_models(rng, tmp_path):
    r = edgequant.quantize(cnn(rng), calib(rng))
    qmap = read_quant_map(r.float_model, r.model)
    conv = next(n for n in r.float_model.graph.node if n.op_type == "Conv")
    kinds = {e.slot: e.kind for e in qmap.edges[conv.name]}
    assert kinds == {0: "activation", 1: "weight", 2: "bias"}
    assert set(qmap.activations().values()) <= {a.tensor for a in r.plan.activations.values()}
    assert len(qmap.activations()) == len(r.plan.activations)

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    float_path, q_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(r.float_model, float_path)
    data = iter([{"x": x} for x in calib(rng, 8)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(data, None)

    quantize_static(str(float_path), str(q_path), Reader(), quant_format=QuantFormat.QDQ)
    foreign = read_quant_map(r.float_model, onnx.load(q_path))
    assert {e.kind for e in foreign.edges[conv.name]} >= {"activation", "weight"}


def _qdq(x, scale, zp, lo, hi):
    return (np.clip(np.round(x / scale) + zp, lo, hi) - zp) * scale


def test_graphwise_and_layerwise_match_a_numpy_oracle(rng):
    data = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(12)]
    r = edgequant.quantize(chain(rng), data, activation_dtype="int8", activation_symmetric=True)
    inits = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    nodes = {n.output[0]: n for n in r.model.graph.node}
    W1, W2 = (numpy_helper.to_array(t) for t in r.float_model.graph.initializer)

    def dq_weight(out_name):  # the dequantized weight feeding a MatMul
        dq = next(n for n in r.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == out_name)
        q, s = inits[dq.input[0]].astype(np.float64), inits[dq.input[1]]
        return (q * s).astype(np.float32)

    mm = [n for n in r.model.graph.node if n.op_type == "MatMul"]
    W1q, W2q = dq_weight(mm[0].input[1]), dq_weight(mm[1].input[1])
    sx = float(inits[nodes[mm[0].input[0]].input[1]])
    sh = float(inits[nodes[mm[1].input[0]].input[1]])
    report = edgequant.analyze(r.float_model, r.model, data, num_samples=8)
    want_h, want_1, want_2 = FidelityAccumulator(), FidelityAccumulator(), FidelityAccumulator()
    for x in data[:8]:
        h = x @ W1
        y = h @ W2
        hq = _qdq(_qdq(x, sx, 0, -128, 127) @ W1q, sh, 0, -128, 127)  # cumulative, at h
        want_h.update(h, hq)
        want_1.update(y, (_qdq(x, sx, 0, -128, 127) @ W1q) @ W2)  # only layer 1 quantized
        want_2.update(y, _qdq(h, sh, 0, -128, 127) @ W2q)  # only layer 2 quantized
    g = {t.name: t for t in report.graphwise}
    assert g["h"].metrics.sqnr_db == pytest.approx(want_h.sqnr_db, abs=0.05)
    layers = {row.node: row for row in report.layerwise}
    first, second = (layers[n.name] for n in r.float_model.graph.node)
    assert first.output.sqnr_db == pytest.approx(want_1.sqnr_db, abs=0.05)
    assert second.output.sqnr_db == pytest.approx(want_2.sqnr_db, abs=0.05)
    assert first.local.sqnr_db < 60 and first.weights == ("W1",) and first.inputs == ("x",)
    assert second.output.sqnr_db == second.local.sqnr_db  # its output is the model output
    assert report.outputs[0].metrics.sqnr_db == pytest.approx(r.summary.fidelity[0].sqnr_db, abs=3)


def test_fixes_prefer_float_where_quantization_makes_inf():
    from edgequant.analysis.analyze import ErrorReport
    from edgequant.analysis.layerwise import LayerError
    from edgequant.analysis.metrics import Metrics

    ok = Metrics(0.9999, 40.0, 1e-4, 0.99, 1e-6, 1e-3)
    mild = Metrics(0.95, 10.0, 0.1, 0.7, 1e-2, 1.0)
    inf = Metrics(1.0, 60.0, 1e-6, 1.0, 0.0, 0.0, nonfinite=3)
    rows = [LayerError("a", "Conv", 1, (), (), ok, ok, "y", 30.0), LayerError("b", "Mul", 2, (), (), mild, mild, "y", None),
            LayerError("c", "Log", 3, (), (), ok, inf, "y", None)]
    rep = ErrorReport(layerwise=rows)
    assert [r.node for r in rep.worst_layers(3)] == ["c", "b", "a"]
    assert rep.fixes(5) == [Override.parse("c=float"), Override.parse("b=int16")]  # values, text at the files


def test_compare_dumps_statuses_and_tolerance(rng):
    a = {"x": rng.standard_normal((2, 8)).astype(np.float32), "ids": np.arange(4), "only_a": np.zeros(1)}
    b = {"x": a["x"] + 0.01, "ids": np.arange(4), "only_b": np.zeros(1)}
    res = compare_dumps(a, b, (0.99, 0.9))
    assert [(r.name, r.status) for r in res.rows] == [("x", "similar"), ("ids", "equal")]
    assert res.only_a == ["only_a"] and res.only_b == ["only_b"] and res.passed
    strict = compare_dumps(a, b, (0.99, 0.9999))
    assert not strict.passed and strict.rows[0].status == "not similar"
    assert compare_dumps(a, {**b, "ids": np.arange(1, 5)}).rows[1].status == "not equal"
    assert compare_dumps(a, {**b, "x": np.zeros(3)}).rows[0].status == "shape differs"
    skipped = compare_dumps(a, b, (0.99, 0.9999), ["x*"])
    assert skipped.passed and skipped.skipped == ["x"]
    assert parse_tolerance("0.9,0.5") == (0.9, 0.5)
    for bad in ("0.9", "a,b", "2,0.5"):
        with pytest.raises(ConfigError):
            parse_tolerance(bad)


def test_npz_dumps_are_reproducible(rng, tmp_path):
    arrays = {"a/b:0": rng.standard_normal((2, 3)).astype(np.float32), "n": np.arange(3)}
    save_npz(tmp_path / "1.npz", arrays)
    save_npz(tmp_path / "2.npz", arrays)
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
    back = load_npz(tmp_path / "1.npz")
    assert list(back) == list(arrays) and all(np.array_equal(back[k], arrays[k]) for k in arrays)


def test_report_files_are_complete_and_offline(rng, tmp_path):
    r = edgequant.quantize(cnn(rng), calib(rng))
    report = edgequant.analyze(r.float_model, r.model, calib(rng, 6), num_samples=6)
    assert report.samples == 6 and report.layerwise_samples == 6
    assert {row.op_type for row in report.layerwise} >= {"Conv", "Gemm"}
    folder = edgequant.write_report(report, tmp_path / "rep")
    assert sorted(p.name for p in folder.iterdir()) == [
        "histograms.png", "report.html", "report.json", "report.md", "summary.png"]
    data = json.loads((folder / "report.json").read_text())
    assert len(data["layerwise"]) == len(report.layerwise) and data["flags"]["snr_above"] == 0.1
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "http://" not in page and "https://" not in page
    assert "<table class=\"sortable\">" in page
    md = (folder / "report.md").read_text()
    assert "| # | layer |" in md and "summary.png" in md
    (folder / "keep.txt").write_text("mine")
    edgequant.write_report(report, folder)  # rewriting leaves other files alone
    assert (folder / "keep.txt").read_text() == "mine"


def test_report_files_are_reproducible(rng, tmp_path):
    r = edgequant.quantize(cnn(rng), calib(rng))
    data = calib(rng, 6)
    for name in ("a", "b"):
        rep = edgequant.analyze(r.float_model, r.model, data, num_samples=6)
        assert all(row.seconds > 0 for row in rep.layerwise)  # timings are in the API, not the files
        edgequant.write_report(rep, tmp_path / name)
    for f in ("report.json", "report.md", "report.html", "summary.png"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_graphwise_flags_mark_where_the_error_jumps_not_every_tensor_after_it():
    from types import SimpleNamespace

    from edgequant.analysis.metrics import Metrics
    from edgequant.analysis.report import error_jumps

    def row(snr, cos, bad=0):
        return SimpleNamespace(metrics=Metrics(cos, 0.0, snr, 0.0, 0.0, 0.0, bad))

    # noise/signal 0.01 → 0.3 (jump) → 0.35 → 0.4 (cumulative, no jump) → 0.9 (jump); cosine 0.95 → 0.93 (drop)
    rows = [row(0.01, 0.999), row(0.3, 0.95), row(0.35, 0.95), row(0.4, 0.949), row(0.9, 0.93), row(0.2, 0.999, 3)]
    assert error_jumps(rows) == [False, True, False, False, True, True]


def test_the_clip_range_of_a_quantized_tensor_is_what_its_dequantize_can_give(rng):
    from edgequant.analysis.graphwise import clip_range
    from tests.unit.test_quantize_graphs import calib, cnn

    r = edgequant.quantize(cnn(rng), calib(rng, 12), method="minmax")
    act = next(a for a in r.plan.activations.values() if a.root == a.tensor and a.tensor != "x")
    p = r.params[act.root]
    dq = next(n for n in r.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == act.tensor)
    lo, hi = clip_range(r.model, dq.output[0])
    s, z = float(p.scale), int(p.zero_point)
    assert (lo, hi) == pytest.approx(((0 - z) * s, (255 - z) * s))
    assert clip_range(r.model, "no such tensor") is None
