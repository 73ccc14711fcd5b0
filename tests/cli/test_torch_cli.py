"""``edgequant export`` and ``edgequant quantize model.pt``: PyTorch files in, named shapes, layouts."""

import json

import numpy as np
import onnx
import pytest

from tests.cli.test_cli import cli

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """A traced Conv-Relu-Linear net saved as TorchScript, and calibration .npy files for it."""
    from tests.unit.test_torch_frontend import Net

    d = tmp_path_factory.mktemp("torch")
    torch.jit.save(torch.jit.trace(Net().eval(), torch.zeros(1, 3, 8, 6)), d / "net.pt")
    rng = np.random.default_rng(0)
    (d / "calib").mkdir()
    for i in range(24):
        np.save(d / "calib" / f"{i:02d}.npy", rng.standard_normal((1, 3, 8, 6)).astype(np.float32))
    return d


def _dims(path):
    return [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]


def test_export_and_quantize_a_torchscript_file(script, tmp_path):
    r = cli("export", script / "net.pt", "-o", tmp_path / "net.onnx", "--input-shape", "image=1x3x8x6")
    assert r.returncode == 0, r.stderr
    assert "matches PyTorch" in r.stdout and _dims(tmp_path / "net.onnx") == [1, 3, 8, 6]
    onnx.checker.check_model(str(tmp_path / "net.onnx"))
    r = cli("export", script / "net.pt", "-o", tmp_path / "nhwc.onnx", "--input-shape", "image=1x8x6x3", "--layout", "NHWC")
    assert r.returncode == 0, r.stderr
    assert _dims(tmp_path / "nhwc.onnx") == [1, 8, 6, 3]
    common = ("--calib", script / "calib", "--input-shape", "image=1x3x8x6", "-q")
    assert cli("quantize", script / "net.pt", "-o", tmp_path / "a.q.onnx", *common).returncode == 0
    assert cli("quantize", tmp_path / "net.onnx", "-o", tmp_path / "b.q.onnx", *common).returncode == 0
    assert (tmp_path / "a.q.onnx").read_bytes() == (tmp_path / "b.q.onnx").read_bytes()
    config = {"model_parameters": {"onnx_model": str(script / "net.pt")},  # XQuant layout: shapes per input
              "calibration_parameters": {"input_parametres": [
                  {"input_name": "image", "input_shape": [1, 3, 8, 6], "data_list_path": str(script / "calib")}]}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    r = cli("-c", tmp_path / "cfg.json", "-o", tmp_path / "c.q.onnx", "-q")
    assert r.returncode == 0, r.stderr
    assert _dims(tmp_path / "c.q.onnx") == [1, 3, 8, 6]


def test_analyze_takes_the_torchscript_file_a_model_was_quantized_from(script, tmp_path):
    common = ("--calib", script / "calib", "--input-shape", "image=1x3x8x6", "-q")
    assert cli("quantize", script / "net.pt", "-o", tmp_path / "net.q.onnx", *common).returncode == 0
    assert cli("export", script / "net.pt", "-o", tmp_path / "net.onnx", "--input-shape", "image=1x3x8x6").returncode == 0
    for name, model in (("pt", script / "net.pt"), ("onnx", tmp_path / "net.onnx")):
        r = cli("analyze", model, tmp_path / "net.q.onnx", *common, "-o", tmp_path / name, "--mode", "graphwise")
        assert r.returncode == 0, r.stderr

    def errors(name):
        data = json.loads((tmp_path / name / "report.json").read_text())
        return [(t["tensor"], t["cosine"]) for t in data["graphwise"]]
    assert errors("pt") == errors("onnx") and errors("pt")  # the same export, the same per-tensor figures
    r = cli("analyze", script / "net.pt", tmp_path / "net.q.onnx", "--calib", script / "calib", "-q")
    assert r.returncode != 0 and "give its input shapes with --input-shape" in r.stderr


def test_torch_files_without_shapes_with_wrong_ones_or_holding_weights_are_one_line_errors(script, tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    cases = [
        (("quantize", script / "net.pt", "--calib", script / "calib"), "give its input shapes with --input-shape NAME=DIMS"),
        (("export", script / "net.pt", "--input-shape", "image=1x8x6x3"), "does not run on image=1x8x6x3 (NCHW)"),
        (("export", tmp_path / "weights.pt", "--input-shape", "image=1x3x8x6"), "holds weights"),
    ]
    for args, match in cases:
        r = cli(*args, "-o", tmp_path / "never.onnx")
        lines = [ln for ln in r.stderr.strip().splitlines() if ln]
        assert r.returncode == 2 and len(lines) == 1 and match in lines[0], (r.returncode, r.stderr)
        assert not (tmp_path / "never.onnx").exists()
