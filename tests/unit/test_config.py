"""Config files in the XQuant layout: accepted as-is, defaults, errors, JSON Schema."""

import json
from importlib import resources

import pytest

from edgequant.calibration.method import Method
from edgequant.config.schema import json_schema, load_config
from edgequant.errors import ConfigError, NotYetSupportedError

XQUANT = {
    "model_parameters": {"onnx_model": "", "output_prefix": "", "working_dir": "", "skip_onnxsim": False},
    "calibration_parameters": {
        "calibration_step": 100, "calibration_device": "cpu", "calibration_type": "default",
        "input_parametres": [{
            "input_name": "data", "input_shape": [1, 3, 224, 224], "dtype": "float32", "file_type": "img",
            "color_format": "bgr", "mean_value": [103.94, 116.78, 123.68], "std_value": [57, 57, 57],
            "preprocess_file": "", "data_list_path": "",
        }],
    },
    "quantization_parameters": {
        "analysis_enable": False, "precision_level": 0, "finetune_level": 0, "max_percentile": 0.9999,
        "custom_setting": [], "truncate_var_names": [],
    },
}


def write(tmp_path, data, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else __import__("yaml").safe_dump(data))
    return path


def test_xquant_sample_is_accepted_with_documented_defaults(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "resnet18.onnx").write_bytes(b"")
    data = json.loads(json.dumps(XQUANT))
    data["model_parameters"]["onnx_model"] = "models/resnet18.onnx"
    cfg = load_config(write(tmp_path, data))
    assert cfg.model_path == tmp_path / "models" / "resnet18.onnx"
    assert cfg.output_path == tmp_path / "models" / "resnet18.q.onnx"
    assert cfg.options.num_samples == 100 and cfg.options.method is Method.PERCENTILE
    assert cfg.options.percentile == pytest.approx(99.99)
    st = cfg.settings[0]
    assert st.color_format == "bgr" and st.mean == (103.94, 116.78, 123.68) and st.shape == (1, 3, 224, 224)
    assert st.preprocess is None and st.data_path is None


def test_both_spellings_yaml_and_output_prefix(tmp_path):
    data = json.loads(json.dumps(XQUANT))
    data["calibration_parameters"]["input_parameters"] = data["calibration_parameters"].pop("input_parametres")
    data["model_parameters"].update(onnx_model="/abs/m.onnx", output_prefix="out", working_dir=str(tmp_path))
    data["calibration_parameters"]["calibration_type"] = "kl"
    cfg = load_config(write(tmp_path, data, "cfg.yaml"))
    assert cfg.output_path == tmp_path / "out.q.onnx" and len(cfg.settings) == 1
    assert cfg.options.method is Method.ENTROPY


def test_preset_preprocess_and_symbolic_batch(tmp_path):
    data = json.loads(json.dumps(XQUANT))
    data["calibration_parameters"]["input_parametres"][0].update(
        preprocess_file="PT_IMAGENET", mean_value=None, std_value=None, input_shape=["N", 3, 224, 224])
    entry = data["calibration_parameters"]["input_parametres"][0]
    entry.pop("color_format", None)
    st = load_config(data).settings[0]
    assert st.mean == (123.675, 116.28, 103.53) and st.color_format == "rgb" and st.shape == (1, 3, 224, 224)
    entry["preprocess_file"] = "IMAGENET"
    assert load_config(data).settings[0].color_format == "bgr"  # the preset's own order
    entry["color_format"] = "rgb"
    assert load_config(data).settings[0].color_format == "rgb"  # what the user wrote beats the preset


@pytest.mark.parametrize("section,key,expect", [
    ("calibration_parameters", "calibration_stpe", "did you mean .*'calibration_step'"),
    ("model_parameters", "onnx_modle", "did you mean 'onnx_model'"),
    ("quantization_parameters", "max_percentil", "did you mean 'max_percentile'"),
])
def test_unknown_keys_are_named_with_a_suggestion(section, key, expect):
    data = json.loads(json.dumps(XQUANT))
    data[section][key] = 1
    with pytest.raises(ConfigError, match=expect):
        load_config(data)


def test_recovery_keys_with_xquant_and_neuropilot_names():
    data = json.loads(json.dumps(XQUANT))
    data["quantization_parameters"].update({"finetune_level": 1, "use_bias_correction": True,
                                           "hessian_opt_block_size": 64, "smoothquant": 0.5})
    rec = load_config(data).options.recovery
    assert rec.rounding == "gptq" and rec.bias == "empirical" and rec.hessian_opt_block_size == 64
    assert rec.smoothquant == 0.5
    data["quantization_parameters"] = {"use_adaround": True, "adaround_optim_steps": 50}
    rec = load_config(data).options.recovery
    assert rec.rounding == "adaround" and rec.adaround_optim_steps == 50
    assert not load_config(json.loads(json.dumps(XQUANT))).options.recovery


def test_later_features_are_rejected_not_ignored():
    data = json.loads(json.dumps(XQUANT))
    data["quantization_parameters"]["finetune_level"] = 3
    with pytest.raises(NotYetSupportedError, match="levels above 2 are not available"):
        load_config(data)
    data["quantization_parameters"] = {"bias_correction": "slow"}
    with pytest.raises(ConfigError, match="quantization_parameters: bias_correction must be empirical or fast"):
        load_config(data)


def test_mixed_precision_keys_become_overrides_in_order():
    from edgequant.calibration.method import Method
    from edgequant.planning.overrides import FLOAT
    from edgequant.planning.selectors import After, Between

    data = json.loads(json.dumps(XQUANT))
    data["quantization_parameters"].update({
        "precision_level": 1, "truncate_var_names": ["/Concat_5_output_0"], "overrides": ["op:Softmax=float"],
        "custom_setting": [{"input_names": ["n2", "n7"], "output_names": ["y"], "precision_level": 2,
                            "max_percentile": 0.999}]})
    ovs = load_config(data).options.overrides
    assert [o.level for o in ovs[:2]] == [1, 2]
    assert ovs[1].selector == Between(("n2", "n7"), ("y",))
    assert ovs[1].method is Method.PERCENTILE and ovs[1].percentile == pytest.approx(99.9)
    assert ovs[2].selector == After(("/Concat_5_output_0",)) and ovs[2].precision == FLOAT
    assert str(ovs[3]) == "op:Softmax=float"
    for bad in ({"precision_level": 5}, {"custom_setting": [{"input_names": ["a"]}]},
                {"custom_setting": [{"input_names": ["a"], "output_names": ["b"], "precison_level": 2}]}):
        data = json.loads(json.dumps(XQUANT))
        data["quantization_parameters"].update(bad)
        with pytest.raises(ConfigError):
            load_config(data)


def test_bad_values_and_files(tmp_path):
    data = json.loads(json.dumps(XQUANT))
    data["calibration_parameters"]["calibration_type"] = "magic"
    with pytest.raises(ConfigError, match="calibration type 'magic' is not implemented; valid: minmax"):
        load_config(data)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(tmp_path / "bad.json")
    data = json.loads(json.dumps(XQUANT))
    data["calibration_parameters"]["calibration_step"] = "many"
    with pytest.raises(ConfigError, match="calibration_parameters.calibration_step"):
        load_config(data)


def test_shipped_schema_is_current():
    shipped = resources.files("edgequant") / "config" / "edgequant-config.schema.json"
    assert json.loads(shipped.read_text()) == json.loads(json.dumps(json_schema()))
    props = json_schema()["$defs"]["CalibrationParameters"]["properties"]
    assert "input_parametres" in props


@pytest.mark.parametrize("text, match", [
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
    (b'{"quantization_parameters": {"max_percentile": ' + b"9" * 5000 + b"}}", "integer with thousands of digits"),
])
def test_config_files_python_cannot_parse_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "c.json"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    folder = tmp_path / "cfg"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_config(folder)
