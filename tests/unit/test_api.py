"""The public Python API: its names, result fields, options and opsets."""

import numpy as np
import onnx
import pytest

import edgequant
from edgequant.ir.model import opset_of
from tests.unit.test_quantize_graphs import calib, cnn

EXPECTED = {
    "CalibrationDataError", "ConfigError", "EdgequantError", "InputSettings", "Method", "ModelLoadError",
    "NotYetSupportedError", "OutputError", "OutputFidelity", "QuantDType", "QuantOptions", "QuantizeResult",
    "Summary", "TensorNameError", "__version__", "make_options", "quantize",
    "ErrorReport", "LayerError", "Metrics", "Override", "TensorError", "analyze", "write_report",
}


def test_public_names_are_pinned():
    assert set(edgequant.__all__) == EXPECTED
    assert all(hasattr(edgequant, n) for n in EXPECTED)


def test_result_fields_and_save(rng, tmp_path):
    model = cnn(rng)
    before = model.SerializeToString()
    result = edgequant.quantize(model, [{"x": x} for x in calib(rng)], method="minmax", per_channel=True)
    assert model.SerializeToString() == before  # the caller's proto is not modified
    assert isinstance(result.options, edgequant.QuantOptions) and result.options.method is edgequant.Method.MINMAX
    assert set(result.ranges) == set(result.plan.roots) and set(result.params) == set(result.plan.roots)
    lo, hi = result.ranges["x"]
    assert lo < 0 < hi
    assert result.summary.calibration_samples + result.summary.eval_samples == 20
    out = result.save(tmp_path / "q.onnx")
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == ["q.onnx"]
    assert onnx.load(str(out)).SerializeToString() == result.model.SerializeToString()


def test_unknown_option_names_the_closest(rng):
    with pytest.raises(edgequant.ConfigError, match="did you mean 'per_channel'"):
        edgequant.quantize(cnn(rng), calib(rng), per_chanel=True)
    with pytest.raises(edgequant.ConfigError, match="percentile must be in"):
        edgequant.quantize(cnn(rng), calib(rng), percentile=101)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_opsets_11_to_21(opset, rng):
    m = cnn(rng)
    m.opset_import[0].version = opset
    r = edgequant.quantize(m, calib(rng))
    assert opset_of(r.model) == max(opset, 13)
    onnx.checker.check_model(r.model)


def test_int32_inputs(rng):
    from tests.unit.test_quantize_graphs import with_weights

    m = with_weights("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (int32[1, 6] ids) => (float[1, 6, 2] y) {
        e = Gather (E, ids)
        y = MatMul (e, WM)
    }""", rng, E=(10, 4), WM=(4, 2))
    r = edgequant.quantize(m, [rng.integers(0, 10, (1, 6)).astype(np.int32) for _ in range(8)])
    assert r.summary.quantized_ops["MatMul"] == 1


def test_failed_opset_upgrade_falls_back_to_per_tensor(rng, monkeypatch):
    import edgequant.api as api
    from edgequant.errors import ModelLoadError

    def refuse(model, minimum):
        if minimum > opset_of(model):
            raise ModelLoadError("cannot upgrade (test)")
        return model

    monkeypatch.setattr(api, "ensure_opset", refuse)
    m = cnn(rng)
    m.opset_import[0].version = 11
    r = edgequant.quantize(m, calib(rng))
    assert opset_of(r.model) == 11 and not r.options.per_channel
    assert r.summary.notes and "per-tensor weights" in r.summary.notes[0]
    onnx.checker.check_model(r.model)
    with pytest.raises(ModelLoadError):
        edgequant.quantize(m, calib(rng), activation_dtype="int16")


def test_model_failing_on_the_data_is_a_one_line_data_error(rng):
    from tests.conftest import parse

    m = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, M] x) => (float[K, 4] y) {
        shape = Constant <value = int64[2] {-1, 4}> ()
        r = Reshape (x, shape)
        y = Relu (r)
    }""")
    good = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(4)]
    bad = good + [rng.standard_normal((1, 7)).astype(np.float32)]
    with pytest.raises(edgequant.CalibrationDataError, match=r"fails on calibration sample 4 \(x \[1, 7\]\)"):
        edgequant.quantize(m, bad, eval_samples=0)
