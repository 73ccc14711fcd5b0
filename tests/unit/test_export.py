"""Interchange files: each parses with its grammar and re-imports to the identical model."""

import json

import numpy as np
import onnx
import pytest
import yaml

import edgequant
from edgequant.errors import ConfigError, TensorNameError
from edgequant.export import export_params, import_params, parse_spec
from edgequant.export.native import recreate
from tests.unit.test_quantize_graphs import calib, cnn


@pytest.fixture
def setup(rng):
    model, data = cnn(rng), calib(rng, 24)
    return model, data, edgequant.quantize(model, data)


def test_qparams_round_trip_and_hand_edited_fp(setup, tmp_path):
    model, data, result = setup
    path = export_params(result, "qparams", tmp_path / "q.json")
    doc = json.loads(path.read_text())
    acts = doc["quantization_params"][0]["activations"]
    assert doc["version"] == "v1" and set(acts) == set(result.plan.activations)
    first = next(iter(acts.values()))
    assert set(first) == {"dtype", "is_symmetric", "min_vals", "max_vals"} and first["dtype"] == "UINT8"
    again = edgequant.quantize(model, data, overrides=import_params("qparams", path))
    assert again.model.SerializeToString() == result.model.SerializeToString()
    # the seed's workflow: export, set one tensor to FP, import → exactly that tensor is float
    name = next(t for t in acts if t in {n.input[0] for n in result.float_model.graph.node if n.op_type == "Gemm"})
    acts[name] = {"dtype": "FP"}
    path.write_text(json.dumps(doc))
    edited = edgequant.quantize(model, data, overrides=import_params("qparams", path))
    assert set(result.plan.activations) - set(edited.plan.activations) == {name}
    for t in edited.plan.activations:
        assert edited.params[edited.plan.activations[t].root].scale == pytest.approx(
            result.params[result.plan.activations[t].root].scale)


def test_tpu_mlir_tables_round_trip(setup, tmp_path):
    model, data, result = setup
    table = export_params(result, "cali-table", tmp_path / "cali_table").read_text()
    rows = [ln.split() for ln in table.splitlines() if ln and not ln.startswith("#")]
    assert rows and all(len(r) == 4 and float(r[1]) == max(abs(float(r[2])), abs(float(r[3]))) for r in rows)
    again = edgequant.quantize(model, data, overrides=import_params("cali-table", tmp_path / "cali_table"))
    assert again.model.SerializeToString() == result.model.SerializeToString()
    gemm = next(n for n in result.float_model.graph.node if n.op_type == "Gemm")
    mixed = edgequant.quantize(model, data, overrides=[f"{gemm.name}=float"])
    qt = export_params(mixed, "qtable", tmp_path / "qtable").read_text()
    assert f"{gemm.output[0]} F32" in qt
    back = edgequant.quantize(model, data, overrides=import_params("qtable", tmp_path / "qtable"))
    assert back.model.SerializeToString() == mixed.model.SerializeToString()
    (tmp_path / "bad").write_text("conv1 INT4\n")
    with pytest.raises(ConfigError, match="INT4"):
        import_params("qtable", tmp_path / "bad")
    (tmp_path / "bad").write_text("nope F32\n")
    with pytest.raises(TensorNameError, match="closest"):
        edgequant.quantize(model, data, overrides=import_params("qtable", tmp_path / "bad"))


def test_acuity_round_trip(setup, tmp_path):
    model, data, result = setup
    conv = next(n for n in result.float_model.graph.node if n.op_type == "Conv" and n.name != "Conv_0")
    mixed = edgequant.quantize(model, data, overrides=[f"{conv.name}=int16"])
    text = export_params(mixed, "acuity", tmp_path / "a.quantize").read_text()
    layers = yaml.safe_load(text)["customized_quantize_layers"]
    assert layers[conv.name] in ("dynamic_fixed_point-i16", "asymmetric_affine-u16")
    assert layers["Conv_0"] == "asymmetric_affine-u8"
    back = edgequant.quantize(model, data, overrides=import_params("acuity", tmp_path / "a.quantize"))
    # Acuity names no signed asymmetric 16-bit type: int16 asymmetric travels as uint16 asymmetric
    assert {a.tensor: (a.dtype.bits, a.symmetric) for a in back.plan.activations.values()} == \
        {a.tensor: (a.dtype.bits, a.symmetric) for a in mixed.plan.activations.values()}
    assert back.summary.fidelity[0].sqnr_db == pytest.approx(mixed.summary.fidelity[0].sqnr_db, abs=0.5)
    sym = edgequant.quantize(model, data, target="acuity-perchannel")
    export_params(sym, "acuity", tmp_path / "s.quantize")
    exact = edgequant.quantize(model, data, target="acuity-perchannel",
                               overrides=import_params("acuity", tmp_path / "s.quantize"))
    assert exact.model.SerializeToString() == sym.model.SerializeToString()
    (tmp_path / "b.quantize").write_text("customized_quantize_layers:\n  Conv_0: float32\n")
    fl = edgequant.quantize(model, data, overrides=import_params("acuity", tmp_path / "b.quantize"))
    assert fl.plan.precision == {"Conv_0": "float"}


def test_native_file_recreates_the_model_without_calibration(setup, tmp_path, rng):
    model, data, result = setup
    path = export_params(result, "edgequant", tmp_path / "p.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "edgequant-params" and doc["weights"][0]["scale"]
    again = recreate(model, path)
    assert again.model.SerializeToString() == result.model.SerializeToString()
    onnx.checker.check_model(again.model)
    other = cnn(np.random.default_rng(99))
    with pytest.raises(ConfigError, match="weights of"):
        recreate(other, path)
    with pytest.raises(ConfigError, match="not an edgequant parameter file"):
        (tmp_path / "x.json").write_text("{}")
        recreate(model, tmp_path / "x.json")


def test_specs_and_missing_files(tmp_path):
    assert parse_spec("qparams:a/b.json")[0] == "qparams"
    for bad in ("qparams", "json:x", ":x"):
        with pytest.raises(ConfigError):
            parse_spec(bad)
    with pytest.raises(ConfigError, match="not found"):
        import_params("qparams", tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"version": "v1", "quantization_params": [{"activations": {"x": {"dtype": "INT3"}}}]}')
    with pytest.raises(ConfigError, match="INT3"):
        import_params("qparams", tmp_path / "bad.json")
