"""``analyze``, ``run``, ``compare`` and ``quantize --analyze`` through subprocesses."""

import json

import numpy as np
import onnx

from edgequant.demo import demo_data
from tests.cli.test_cli import MODEL, cli, npz_dir  # noqa: F401  (fixture)


def one_line_error(r, match):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.stderr


def test_quantize_with_analyze_and_override(tmp_path, npz_dir):  # noqa: F811
    out = tmp_path / "m.q.onnx"
    r = cli("quantize", MODEL, "-o", out, "--calib", npz_dir, "--analyze")
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "m.q_report"
    assert {p.name for p in folder.iterdir()} >= {"report.md", "report.html", "report.json", "summary.png"}
    assert "worst layers" in r.stdout and "report written to" in r.stdout
    layers = json.loads((folder / "report.json").read_text())["layerwise"]
    conv = next(row["node"] for row in layers if row["op_type"] == "Conv")
    out2 = tmp_path / "m2.q.onnx"
    r = cli("quantize", MODEL, "-o", out2, "--calib", npz_dir, "-q", "--override", f"{conv}=float")
    assert r.returncode == 0, r.stderr
    q = onnx.load(str(out2))
    node = next(n for n in q.graph.node if n.name == conv)
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producers.get(node.input[1]) is None, "weight stays a float initializer"


def test_analyze_command_and_its_errors(tmp_path, npz_dir):  # noqa: F811
    q = tmp_path / "m.q.onnx"
    assert cli("quantize", MODEL, "-o", q, "--calib", npz_dir, "-q").returncode == 0
    r = cli("analyze", MODEL, q, "--calib", npz_dir, "-o", tmp_path / "rep", "--mode", "graphwise",
            "--num-samples", "8")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["graphwise"] and not data["layerwise"] and data["samples"]["graphwise"] == 8
    one_line_error(cli("analyze", MODEL, tmp_path / "nope.onnx", "--calib", npz_dir, "-o", tmp_path / "r2"),
                   "not found")
    one_line_error(cli("analyze", MODEL, MODEL, "--calib", npz_dir, "-o", tmp_path / "r3"),
                   "no QuantizeLinear/DequantizeLinear")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_run_and_compare_follow_the_tolerance(tmp_path, npz_dir):  # noqa: F811
    q = tmp_path / "m.q.onnx"
    assert cli("quantize", MODEL, "-o", q, "--calib", npz_dir, "-q").returncode == 0
    x = tmp_path / "x.npz"
    np.savez(x, image=demo_data()["test_x"][:4])
    fa, qa = tmp_path / "f.npz", tmp_path / "q.npz"
    r = cli("run", MODEL, "--inputs", x, "--dump-all", "-o", fa)
    assert r.returncode == 0 and "tensors written" in r.stdout, r.stderr
    assert cli("run", q, "--inputs", x, "--dump-all", "-o", qa, "-q").returncode == 0
    f_names, q_names = set(np.load(fa).files), set(np.load(qa).files)
    assert len(f_names) > 5 and len(f_names & q_names) > 5
    ok = cli("compare", fa, qa, "--tolerance", "0.5,0.0")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "only in the second file" in ok.stdout  # Q/DQ tensors exist only in the quantized dump
    strict = cli("compare", fa, qa, "--tolerance", "0.99999,0.999")
    assert strict.returncode == 1 and "FAILED" in strict.stdout
    logits = onnx.load(str(MODEL)).graph.output[0].name
    common = sorted(f_names & q_names - {logits})
    skip = cli("compare", fa, qa, "--tolerance", "1,1", "--except", ",".join(common))
    assert skip.returncode == 1  # only the logits are compared now, and they differ a little
    same = cli("compare", fa, fa, "--tolerance", "1,1")
    assert same.returncode == 0
    # the int8 preset: a healthy int8 model against float passes every tensor, the float preset need not
    preset = cli("compare", fa, qa, "--preset", "int8")
    assert preset.returncode == 0 and "tolerance cosine 0.85, euclidean 0.45" in preset.stdout, preset.stdout
    one_line_error(cli("compare", fa, qa, "--tolerance", "0.9"), "COSINE,EUCLIDEAN")
    one_line_error(cli("compare", fa, tmp_path / "nope.npz"), "file not found")
    other = tmp_path / "other.npz"
    np.savez(other, zzz=np.zeros(3))
    one_line_error(cli("compare", fa, other), "no tensor name in common")
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((1, 3), np.float32))
    one_line_error(cli("run", MODEL, "--inputs", bad, "-o", tmp_path / "o.npz"), "fails on")
    np.savez(bad, image=np.full((1, 1, 28, 28), np.nan, np.float32))
    one_line_error(cli("run", MODEL, "--inputs", bad, "-o", tmp_path / "o.npz"), "NaN")
    np.savez(bad, imag=np.zeros((1, 1, 28, 28), np.float32), other=np.zeros(1))
    one_line_error(cli("run", MODEL, "--inputs", bad, "-o", tmp_path / "o.npz"), "no array for model input 'image'")
    assert not (tmp_path / "o.npz").exists()


def test_export_and_import_parameter_files(tmp_path, npz_dir):  # noqa: F811
    out = tmp_path / "m.q.onnx"
    r = cli("quantize", MODEL, "-o", out, "--calib", npz_dir, "-q", "--target", "tpu-mlir",
            "--export-params", f"edgequant:{tmp_path / 'p.json'}", "--export-params", f"cali-table:{tmp_path / 'cali'}",
            "--export-params", f"qparams:{tmp_path / 'q.json'}")
    assert r.returncode == 0, r.stderr
    assert all((tmp_path / f).is_file() for f in ("p.json", "cali", "q.json"))
    again = tmp_path / "again.onnx"
    r = cli("quantize", MODEL, "-o", again, "--import-params", f"edgequant:{tmp_path / 'p.json'}")  # no --calib
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == out.read_bytes()
    check = cli("check", again, "--target", "tpu-mlir")
    assert check.returncode == 0 and "obeys" in check.stdout
    assert cli("check", again, "--target", "espdl").returncode == 1
    r = cli("quantize", MODEL, "-o", tmp_path / "c.onnx", "--calib", npz_dir, "-q", "--target", "tpu-mlir",
            "--import-params", f"cali-table:{tmp_path / 'cali'}")
    assert r.returncode == 0 and (tmp_path / "c.onnx").read_bytes() == out.read_bytes()
    one_line_error(cli("quantize", MODEL, "-o", tmp_path / "x.onnx", "--calib", npz_dir, "--export-params", "json:x"),
                   "FORMAT:PATH")
    one_line_error(cli("quantize", MODEL, "-o", tmp_path / "x.onnx", "--calib", npz_dir, "--target", "esp"),
                   "unknown target")
    assert not (tmp_path / "x.onnx").exists()
    assert "espdl" in cli("targets").stdout and "power" in cli("targets", "show", "espdl").stdout


def test_analyze_takes_a_config_file_with_a_preprocess_function(tmp_path, npz_dir):  # noqa: F811
    q = tmp_path / "m.q.onnx"
    assert cli("quantize", MODEL, "-o", q, "--calib", npz_dir, "-q").returncode == 0
    digits = tmp_path / "digits"
    digits.mkdir()
    for i in range(8):
        (digits / f"{i}.txt").write_text(str(i))
    (tmp_path / "pre.py").write_text(
        "import numpy as np\n"
        "def load(paths, params):\n"
        "    return np.stack([np.full((1, 28, 28), int(open(p).read()) / 10, np.float32) for p in paths])\n")
    cfg = {"model_parameters": {"onnx_model": str(MODEL)},
           "calibration_parameters": {"input_parametres": [{"input_name": "image", "data_list_path": "digits",
                                                            "preprocess_file": "pre.py:load"}]},
           "quantization_parameters": {}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = cli("analyze", MODEL, q, "-c", tmp_path / "cfg.json", "-o", tmp_path / "rep", "-q", "--num-samples", "8")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["samples"] == {"graphwise": 8, "layerwise": 8}
    one_line_error(cli("analyze", MODEL, q, "-o", tmp_path / "rep2"), "no calibration data")
