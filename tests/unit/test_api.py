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
    "ErrorReport", "LayerError", "Metrics", "Override", "TensorError", "analyze", "write_report", "auto_mixed",
    "from_torch",
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
    import edgequant.pipeline as pipeline
    from edgequant.errors import ModelLoadError

    def refuse(model, minimum):
        if minimum > opset_of(model):
            raise ModelLoadError("cannot upgrade (test)")
        return model

    monkeypatch.setattr(pipeline, "ensure_opset", refuse)
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


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_the_same_files_under_shuffled_names_give_identical_bytes(method, tmp_path):
    """Calibration files read in another order (renamed) give the same model, for every method."""
    from edgequant.demo import asset, demo_data

    x = demo_data()["calib_x"][:40]
    models = set()
    for seed in range(3):
        folder = tmp_path / f"order{seed}"
        folder.mkdir()
        for rank, i in enumerate(np.random.default_rng(seed).permutation(len(x))):
            np.savez(folder / f"{rank:03d}.npz", image=x[i : i + 1])
        r = edgequant.quantize(asset("mnist_cnn.onnx"), folder, method=method, eval_samples=0)
        models.add(r.model.SerializeToString())
    assert len(models) == 1


def test_pre_ir4_models_quantize_to_a_model_the_checker_accepts(rng):
    from onnx import helper, numpy_helper

    W = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    B = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8]),
              helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [4, 3, 3, 3]),
              helper.make_tensor_value_info("B", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], initializer=[W, B])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 7)])
    m.ir_version = 3
    r = edgequant.quantize(m, [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(10)])
    for model in (r.float_model, r.model):
        onnx.checker.check_model(model, full_check=True)
    assert r.model.ir_version >= 4 and r.summary.fidelity[0].cosine > 0.999


def test_options_are_parsed_once_with_one_line_errors():
    opts = edgequant.make_options(method="entropy", activation_dtype="int16", overrides={"Conv_0": "float"})
    assert opts.method is edgequant.Method.ENTROPY and opts.activation_dtype is edgequant.QuantDType.INT16
    assert opts.overrides == (edgequant.Override.parse("Conv_0=float"),)
    assert edgequant.make_options(num_samples=None).num_samples is None  # all samples
    assert edgequant.make_options(percentile=99).percentile == 99.0
    for bad, match in (({"method": None}, "cannot be None"), ({"batch_size": "4"}, "must be int"),
                       ({"per_channel": 1}, "must be bool"), ({"share_concat": True}, "unknown option")):
        with pytest.raises(edgequant.ConfigError, match=match):
            edgequant.make_options(**bad)
    espdl = edgequant.make_options(target="espdl", per_channel=False)  # the profile first, explicit options win
    assert espdl.scheme.power_of_two and not espdl.per_channel


def test_overrides_beyond_the_calibrated_opset_name_the_fix(rng):
    from edgequant.api import calibrate

    state = calibrate(cnn(rng), calib(rng))  # int8 needs opset 13 only
    node = next(n.name for n in state.model.graph.node if n.op_type == "Conv")
    with pytest.raises(edgequant.ConfigError, match="calibrate with min_opset=21"):
        state.plan_with([edgequant.Override.parse(f"{node}=int16")])
    wide = calibrate(cnn(rng), calib(rng), min_opset=21)
    plan = wide.plan_with([edgequant.Override.parse(f"{node}=int16")])
    assert plan.precision == {node: "int16"}


def test_an_invalid_model_is_named_down_to_its_node():
    from onnx import parser

    from edgequant.pipeline import check_onnx

    m = parser.parse_model('<ir_version: 8, opset_import: ["" : 14]>\ng (float[1] x) => (float[1] y) '
                           '{ y = Clip <min = 0.0> (x) }')
    m.graph.node[0].name = "my_clip"
    with pytest.raises(edgequant.errors.ModelLoadError) as info:
        check_onnx(m)
    assert str(info.value) == "the model is not valid ONNX: Unrecognized attribute: min for operator Clip " \
        "(at Name: my_clip OpType: Clip)"


def test_the_package_is_typed_and_licensed():
    from importlib import resources
    from pathlib import Path

    assert (resources.files("edgequant") / "py.typed").is_file()  # PEP 561: type checkers read our hints
    text = (Path(__file__).resolve().parents[2] / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_few_calibration_samples_get_a_note(rng):
    model = cnn(rng)
    few = edgequant.quantize(model, calib(rng, 6), eval_samples=0)
    assert any(n.startswith("only 6 calibration samples") for n in few.summary.notes)
    enough = edgequant.quantize(model, calib(rng, 20), eval_samples=0)
    assert not any("calibration sample" in n for n in enough.summary.notes)


def test_models_past_protobufs_limit_run_and_save_through_external_data(rng, tmp_path, monkeypatch):
    """Past 2 GiB a model cannot be serialised whole: sessions load it from a file with its
    weights beside it, and it is saved that way, without the model in memory changing. The
    limits are lowered here so that a small model takes that path."""
    from types import SimpleNamespace

    from google.protobuf.message import EncodeError

    from edgequant.ir import model as ir_model
    from edgequant.runtime import session

    model, data = cnn(rng), calib(rng, 12)
    want = edgequant.quantize(model, data, eval_samples=2)
    monkeypatch.setattr(session, "_LIMIT", 100)
    monkeypatch.setattr(ir_model, "EXTERNAL_DATA_THRESHOLD", 100)
    got = edgequant.quantize(model, data, eval_samples=2)
    assert got.model.SerializeToString() == want.model.SerializeToString()  # the same model, every weight inline
    path = got.save(tmp_path / "q.onnx")
    assert (tmp_path / "q.onnx.data").exists()
    np.testing.assert_array_equal(session.make_session(onnx.load(str(path))).run(None, {"x": data[0]})[0],
                                  session.make_session(want.model).run(None, {"x": data[0]})[0])
    before = model.SerializeToString()
    ir_model.save_with_external_data(model, tmp_path / "f.onnx", "f.data", size_threshold=65)
    assert model.SerializeToString() == before  # the model given is not turned into references
    back = onnx.load(str(tmp_path / "f.onnx"), load_external_data=False)
    assert {t.name for t in back.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} == {"W1", "W3"}
    assert (tmp_path / "f.data").stat().st_size == 4 * (4 * 3 * 3 * 3 + 10 * 64)

    def too_big():
        raise EncodeError("Failed to serialize proto")

    huge = SimpleNamespace(ByteSize=too_big, dims=[3, 1 << 28], data_type=onnx.TensorProto.FLOAT)  # 3 GiB
    proto = SimpleNamespace(ByteSize=too_big, graph=SimpleNamespace(initializer=[huge],
                                                                     node=[]))
    assert ir_model.byte_size(proto) == 3 << 30
