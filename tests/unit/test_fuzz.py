"""Fuzzing the loaders: configs, override files, every parameter-file format, model and .npz
bytes. Whatever they are given, they either succeed or raise an ``EdgequantError`` (one line
and exit 2 in the CLI), never another exception. Seconds in all (60 examples each, derandomized)."""

import json
import string

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgequant
from edgequant.config.schema import (
    CalibrationParameters,
    ConfigFile,
    InputParameters,
    ModelParameters,
    QuantizationParameters,
    load_config,
)
from edgequant.data import InputSpec, open_calibration
from edgequant.demo import asset
from edgequant.errors import EdgequantError
from edgequant.export import export_params, import_params
from edgequant.export.native import recreate
from edgequant.ir.model import load_model

MODEL = asset("mnist_cnn.onnx")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

leaves = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(string.printable, max_size=12) | st.sampled_from(["auto", "int16", "float", "minmax", "NCHW", ""]))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(string.ascii_letters + "_", max_size=10), inner, max_size=4),
                      max_leaves=16)
SECTIONS = {"model_parameters": ModelParameters, "calibration_parameters": CalibrationParameters,
            "quantization_parameters": QuantizationParameters}
keys = {name: sorted(cls.model_fields) + ["typo_key"] for name, cls in SECTIONS.items()}
section = st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda name: st.tuples(st.just(name), st.dictionaries(st.sampled_from(keys[name]), values, max_size=5)))
inputs = st.lists(st.dictionaries(st.sampled_from(sorted(InputParameters.model_fields)), values, max_size=5),
                  max_size=2)


def _clean(call, *args):
    try:
        call(*args)
    except EdgequantError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(exc)


@FUZZ
@given(st.lists(section, max_size=4), inputs, st.sampled_from(list(ConfigFile.model_fields) + ["junk"]))
def test_configs_load_or_say_why(tmp_path_factory, sections, params, extra):
    data: dict = {name: body for name, body in sections}
    data.setdefault("calibration_parameters", {})["input_parametres"] = params
    data.setdefault(extra, {})
    folder = tmp_path_factory.mktemp("cfg")
    _clean(load_config, data)
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    _clean(load_config, path)


@FUZZ
@given(values, st.binary(max_size=64))
def test_override_files_load_or_say_why(tmp_path_factory, value, junk):
    from pathlib import Path

    from edgequant.cli.quantize import read_override_file

    folder = Path(tmp_path_factory.mktemp("ovr"))
    for text in (yaml.safe_dump({"overrides": value}), yaml.safe_dump(value), junk):
        path = folder / "o.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        _clean(read_override_file, path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every parameter format as edgequant writes it for the MNIST CNN."""
    from edgequant.demo import demo_data

    folder = tmp_path_factory.mktemp("params")
    result = edgequant.quantize(MODEL, list(demo_data()["calib_x"][:16]), eval_samples=0)
    names = {"qparams": "q.json", "cali-table": "cali", "qtable": "qtable", "acuity": "m.quantize",
             "edgequant": "p.json"}
    return {fmt: export_params(result, fmt, folder / name).read_text() for fmt, name in names.items()}


def _mutate(text: str, data) -> str:
    """The text with a line dropped, a line's value replaced, or a JSON value swapped."""
    lines = text.splitlines()
    how = data.draw(st.sampled_from(["drop", "replace", "truncate", "json"]))
    if how == "json" and text.lstrip().startswith("{"):
        doc = json.loads(text)
        path = doc
        while isinstance(path, dict | list) and path:
            key = data.draw(st.sampled_from(list(path) if isinstance(path, dict) else list(range(len(path)))))
            if not isinstance(path[key], dict | list) or data.draw(st.booleans()):
                path[key] = data.draw(values)
                break
            path = path[key]
        return json.dumps(doc)
    if how == "drop" and lines:
        del lines[data.draw(st.integers(0, len(lines) - 1))]
    elif how == "replace" and lines:
        k = data.draw(st.integers(0, len(lines) - 1))
        head = lines[k].rsplit(" ", 1)[0] if " " in lines[k] else ""
        lines[k] = f"{head} {data.draw(st.text(string.printable, max_size=10))}"
    else:
        return text[: data.draw(st.integers(0, len(text)))]
    return "\n".join(lines)


@FUZZ
@given(st.sampled_from(["qparams", "cali-table", "qtable", "acuity", "edgequant"]), st.data())
def test_parameter_files_load_or_say_why(tmp_path_factory, exported, fmt, data):
    path = tmp_path_factory.mktemp("p") / "params"
    path.write_text(_mutate(exported[fmt], data), encoding="utf-8")
    if fmt == "edgequant":
        _clean(recreate, MODEL, path)
    else:
        _clean(import_params, fmt, path)


@FUZZ
@given(st.binary(max_size=256), st.integers(0, 100))
def test_model_and_npz_bytes_load_or_say_why(tmp_path_factory, junk, cut):
    folder = tmp_path_factory.mktemp("b")
    model = MODEL.read_bytes()
    for name, data in (("junk.onnx", junk), ("cut.onnx", model[: len(model) * cut // 100])):
        (folder / name).write_bytes(data)
        _clean(load_model, folder / name)
    good = folder / "good.npz"
    np.savez(good, image=np.zeros((2, 1, 28, 28), np.float32))
    raw = good.read_bytes()
    spec = [InputSpec("image", (None, 1, 28, 28), np.dtype(np.float32))]
    for data in (junk, raw[: len(raw) * cut // 100]):
        calib = folder / "calib"
        calib.mkdir(exist_ok=True)
        (calib / "a.npz").write_bytes(data)
        _clean(lambda c: list(open_calibration(c, spec).samples()), calib)
