"""Interchange files: each parses with its grammar and re-imports to the identical model."""

import json
import re
import sys

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
    assert f"{gemm.output[0]}_Gemm F32" in qt  # TPU-MLIR names ops <output>_<OpType>
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


TPU_GRAPH = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] r, float[1, 32, 5] a, float[1, 2, 8, 8] s0, float[1, 2, 8, 8] s1) {
    y = Conv <pads = [1, 1, 1, 1]> (x, W)
    z = BatchNormalization (y, gamma, beta, mean, var)
    c = Conv <pads = [1, 1, 1, 1]> (z, W2)
    b = Add (c, B)
    i = Identity (b)
    r = Relu (i)
    f = Reshape (r, S)
    m = MatMul (f, M)
    a = Add (m, A)
    s0, s1 = Split <axis = 1> (r, two)
}
"""


def tpu_model(rng):
    m = onnx.parser.parse_model(TPU_GRAPH)
    for name, shape in dict(W=(4, 3, 3, 3), W2=(4, 4, 3, 3), B=(1, 4, 1, 1), M=(8, 5), A=(5,), gamma=(4,),
                            beta=(4,), mean=(4,)).items():
        m.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    extra = {"var": rng.uniform(0.5, 2, 4).astype(np.float32), "S": np.array([1, 32, 8], np.int64),
             "two": np.array([2, 2], np.int64)}
    m.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in extra.items())
    onnx.checker.check_model(m)
    return m


def test_tpu_mlir_op_names_follow_its_onnx_front_end(rng):
    """TPU-MLIR 1.30 names an op <first output>_<OpType>, a graph input by its name, after
    onnxsim folded BatchNorm into the Conv (the Conv's name) and a per-channel Add into the Conv's
    bias (the Conv's name); MatMul + Add is a Gemm named after the Add."""
    from edgequant.export.tpu_mlir import op_names

    names = op_names(tpu_model(rng).graph)
    assert names["x"] == "x" and names["y"] == names["z"] == "y_Conv"
    assert names["c"] == names["b"] == names["i"] == "c_Conv" and names["r"] == "r_Relu"
    assert names["f"] == "f_Reshape" and names["m"] == "m_MatMul" and names["a"] == "a_Gemm"
    assert names["s0"] == "s0_Split" and names["s1"] == "s1_Split"


def test_tpu_mlir_tables_use_its_names_its_floor_and_its_number_grammar(rng, tmp_path):
    import re

    model = tpu_model(rng)
    data = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(12)]
    result = edgequant.quantize(model, data, target="tpu-mlir")
    text = export_params(result, "cali-table", tmp_path / "t").read_text()
    rows = {ln.split()[0]: ln for ln in text.splitlines() if not ln.startswith("#")}
    assert all(re.fullmatch(r"\S+\s+[-0-9.e]+\s+[-0-9.e]+\s+[-0-9.e]+", ln) for ln in rows.values())  # its reader
    # the input; the Conv+BN as one op; Conv + bias Add + Relu as one (the Relu's); the Gemm; the outputs
    assert {"x", "y_Conv", "r_Relu", "a_Gemm", "s0_Split", "s1_Split"} <= set(rows)
    assert "c_Conv" not in rows and "m_MatMul" not in rows  # fused: no quantization of their own
    assert float(rows["r_Relu"].split()[2]) == 0.0  # min 0: TPU-MLIR makes it unsigned, as the QDQ model
    again = edgequant.quantize(model, data, target="tpu-mlir", overrides=import_params("cali-table", tmp_path / "t"))
    assert again.model.SerializeToString() == result.model.SerializeToString()

    zero = result.ranges.copy()
    zero[next(iter(zero))] = (0.0, 0.0)
    import dataclasses

    from edgequant.export.tpu_mlir import dumps_cali_table
    first = dumps_cali_table(dataclasses.replace(result, ranges=zero)).splitlines()[3]
    assert first.split()[1:] == ["1.0000000e-05", "0.0000000", "1.0000000e-05"]  # TPU-MLIR's floor


def test_tpu_mlir_own_table_imports_with_its_sections_and_fused_names(rng, tmp_path):
    model = tpu_model(rng)
    data = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(12)]
    own = tmp_path / "own"
    own.write_text("# mlir version: v1.30.2 cali version 1.0\n# op_name    threshold    min    max\n"
                   "x 3.0000000 -3.0000000 3.0000000\ny_Conv 5.0000000 -4.0000000 5.0000000\n"
                   "c_Conv 7.0000000 -7.0000000 7.0000000\nr_Relu 6.0000000 0.0000000 6.0000000\n"
                   "a_Gemm 9.0000000 -9.0000000 9.0000000\n#int4_th\nr_Relu 1.0000000 0.0000000 1.0000000\n")
    r = edgequant.quantize(model, data, target="tpu-mlir", overrides=import_params("cali-table", own))
    assert r.ranges["x"] == (-3.0, 3.0) and r.ranges["z"] == (-4.0, 5.0)  # z: the Conv+BN op's output
    assert r.ranges["r"] == (0.0, 6.0) and r.ranges["a"] == (-9.0, 9.0)  # the int4 block is not read
    own.write_text("nope_Conv 1.0 -1.0 1.0\n")
    with pytest.raises(TensorNameError, match="names no op of the model"):
        edgequant.quantize(model, data, target="tpu-mlir", overrides=import_params("cali-table", own))


def test_tpu_mlir_qtable_lists_every_layer_run_in_float_and_says_what_it_cannot(rng, tmp_path):
    model = tpu_model(rng)
    data = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(12)]
    mixed = edgequant.quantize(model, data, target="tpu-mlir", overrides=["op:MatMul=float"])
    table = export_params(mixed, "qtable", tmp_path / "q").read_text()
    assert "m_MatMul F32" in table.splitlines()
    back = edgequant.quantize(model, data, target="tpu-mlir", overrides=import_params("qtable", tmp_path / "q"))
    assert back.summary.precision == mixed.summary.precision
    wide = edgequant.quantize(model, data, target="tpu-mlir", overrides=["op:MatMul=int16"])
    assert "MatMul" not in export_params(wide, "qtable", tmp_path / "w").read_text().split("quantize_mode")[1]
    assert any("no integer mode for 1 layers" in n for n in wide.summary.notes)


def test_espdl_spec_holds_the_qdq_models_power_of_two_scales_and_refuses_what_it_cannot(rng, tmp_path, monkeypatch):
    """What esp-ppq is given: every activation's scale, each weight's per-channel scales as the
    QDQ model holds them (powers of two), the int16 layers; refused before any work: another
    target, rounding recovery, a missing esp-ppq (one line saying how to install it)."""
    import math

    from edgequant.export import check_exportable
    from edgequant.export.espdl import spec
    from edgequant.planning.options import Recovery

    model, data = cnn(rng), calib(rng, 24)
    r = edgequant.quantize(model, data, target="espdl", overrides=["Conv_3=int16"])
    job = spec(r)
    assert job["target"] == "esp32p4" and job["bits"] == 8 and job["int16"] == ["Conv_3"]
    assert set(job["activations"]) >= set(r.plan.activations) and "y" in job["activations"]  # outputs too
    assert all(2.0 ** round(math.log2(s)) == s for s in job["activations"].values())
    assert len(job["weights"]["W1"]) == 4 and all(2.0 ** round(math.log2(s)) == s for s in job["weights"]["W1"])
    assert spec(edgequant.quantize(model, data, target="espdl-s3"))["target"] == "esp32s3"
    monkeypatch.setenv("EDGEQUANT_ESPPQ_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="EDGEQUANT_ESPPQ_PYTHON"):
        check_exportable("espdl", Recovery())
    monkeypatch.setenv("EDGEQUANT_ESPPQ_PYTHON", sys.executable)
    with pytest.raises(ConfigError, match="ESP-DL target"):
        check_exportable("espdl", Recovery(), "tpu-mlir")
    with pytest.raises(ConfigError, match="cannot hold"):
        check_exportable("espdl", Recovery(gptq=True), "espdl")
    monkeypatch.delenv("EDGEQUANT_ESPPQ_PYTHON")
    import importlib.util

    if importlib.util.find_spec("esp_ppq") is None:
        with pytest.raises(ConfigError, match=r"pip install \"edgequant\[espdl\]\""):
            export_params(r, "espdl", tmp_path / "m.espdl")
        assert not (tmp_path / "m.espdl").exists()
    with pytest.raises(ConfigError, match="not read back"):
        import_params("espdl", tmp_path / "m.espdl")


def test_imported_files_with_nan_inf_negative_or_reversed_values_are_refused(setup, tmp_path):
    """A NaN, infinite or reversed range, or a scale that is not finite and positive, would
    write a model whose output no longer depends on its input: one line naming the tensor."""
    model, data, result = setup
    name = next(iter(result.plan.activations))
    for row in (f"{name} nan -1.0 1.0", f"{name} 1.0 -inf 1.0", f"{name} 1.0 2.0 1.0"):
        (tmp_path / "t").write_text(row + "\n")
        with pytest.raises(ConfigError, match="must be finite with min ≤ max"):
            import_params("cali-table", tmp_path / "t")
    doc = json.loads(export_params(result, "edgequant", tmp_path / "p.json").read_text())
    root = next(iter(doc["params"]))
    for bad in (float("nan"), -0.5):
        doc["params"][root]["scale"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(doc))
        with pytest.raises(ConfigError, match="finite and positive"):
            recreate(model, tmp_path / "bad.json")


def _edited(doc: dict, change) -> dict:
    out = json.loads(json.dumps(doc))
    change(out)
    return out


def test_malformed_parameter_files_are_named_with_what_is_wrong(setup, tmp_path):
    """Keys missing, values of the wrong type, unknown dtypes, zero points out of range:
    one ConfigError naming the file, never another exception."""
    model, _, result = setup
    native = json.loads(export_params(result, "edgequant", tmp_path / "p.json").read_text())
    qp = json.loads(export_params(result, "qparams", tmp_path / "q.json").read_text())
    root = next(iter(native["params"]))
    act = next(iter(qp["quantization_params"][0]["activations"]))
    cases = [
        ("edgequant", _edited(native, lambda d: d.pop("weights")), "no 'weights' key"),
        ("edgequant", _edited(native, lambda d: d["params"][root].update(scale="abc")), "wrong type or range"),
        ("edgequant", _edited(native, lambda d: d.update(activations={"a": 1})), "wrong type or range"),
        ("edgequant", _edited(native, lambda d: d["params"][root].update(dtype="uint9")), "unknown dtype 'uint9'"),
        ("edgequant", _edited(native, lambda d: d["weights"][0].update(dtype="int3")), "unknown dtype 'int3'"),
        ("edgequant", _edited(native, lambda d: d["params"][root].update(zero_point=999)),
         "is [999]; a uint8 zero point is an integer in [0, 255]"),
        ("edgequant", _edited(native, lambda d: d["params"][root].update(zero_point=1.5)), "zero point"),
        ("qparams", _edited(qp, lambda d: d["quantization_params"][0]["activations"][act].update(min_vals="a")),
         "malformed qparams file"),
        ("qparams", _edited(qp, lambda d: d.update(quantization_params={"a": 1})), "malformed qparams file"),
        ("qparams", _edited(qp, lambda d: d["quantization_params"][0].update(activations=[1, 2])),
         "malformed qparams file"),
    ]
    for k, (fmt, doc, match) in enumerate(cases):
        path = tmp_path / f"bad{k}.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(edgequant.ConfigError, match=re.escape(match)) as info:
            recreate(model, path) if fmt == "edgequant" else import_params(fmt, path)
        assert str(path) in str(info.value), info.value
    for text, match in ((b"\xff\xfe{}", "is not UTF-8 text"), (b"[" * 100000 + b"]" * 100000, "nested too deeply")):
        path = tmp_path / "odd.json"
        path.write_bytes(text)
        with pytest.raises(edgequant.ConfigError, match=match):
            import_params("qparams", path)
