"""The command line, run as a user would: through subprocesses, exit codes and files."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgequant.demo import asset, demo_data

MODEL = asset("mnist_cnn.onnx")


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgequant", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def npz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    x = demo_data()["calib_x"][:40]
    for i in range(0, 40, 4):
        np.savez(d / f"batch{i:03d}.npz", image=x[i : i + 4])
    return d


def test_help_shows_examples():
    r = cli("quantize", "--help")
    assert r.returncode == 0 and "Examples:" in r.stdout and "--calib" in r.stdout
    assert "demo" in cli("--help").stdout


def test_quantize_with_defaults_writes_a_valid_model(tmp_path, npz_dir):
    out = tmp_path / "m.q.onnx"
    r = cli("quantize", MODEL, "-o", out, "--calib", npz_dir, "-q")
    assert r.returncode == 0, r.stderr
    onnx.checker.check_model(str(out))
    assert MODEL.read_bytes() == asset("mnist_cnn.onnx").read_bytes()
    r = cli("quantize", MODEL, "-o", out, "--calib", npz_dir)
    assert "quantized ops" in r.stdout and "cosine" in r.stdout and "held-out" in r.stdout
    assert str(out) in r.stdout.replace("\n", "")
    lines = r.stdout.splitlines()  # piped: no row padded out to the table's width
    assert lines and not [ln for ln in lines if ln != ln.rstrip()], [ln for ln in lines if ln != ln.rstrip()][:3]


def test_json_writes_the_summary_beside_the_model(tmp_path, npz_dir):
    out = tmp_path / "m.q.onnx"
    r = cli("quantize", MODEL, "-o", out, "--calib", npz_dir, "-q", "--json", "--bias-correction", "fast")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "m.q.summary.json").read_text())
    assert doc["model"] == str(out) and doc["quantized_ops"]["Conv"] == 2 and doc["collapse"] is None
    assert doc["fidelity"][0]["name"] == "logits" and doc["fidelity"][0]["cosine"] > 0.99
    assert doc["recovery"][0]["name"] == "bias correction (fast)" and doc["calibration_samples"] > 0


def test_same_inputs_same_bytes(tmp_path, npz_dir):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b):
        assert cli("quantize", MODEL, "-o", out, "--calib", npz_dir, "-q", "--method", "percentile").returncode == 0
    assert a.read_bytes() == b.read_bytes()


def test_worker_processes_give_the_same_bytes_and_bad_values_are_refused(tmp_path, npz_dir):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert cli("quantize", MODEL, "-o", a, "--calib", npz_dir, "-q", "--method", "entropy").returncode == 0
    r = cli("quantize", MODEL, "-o", b, "--calib", npz_dir, "-q", "--method", "entropy", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()
    bad = cli("quantize", MODEL, "-o", tmp_path / "c.onnx", "--calib", npz_dir, "--workers", "2", "--ray", "h:1")
    assert bad.returncode == 2 and "not both" in bad.stderr and not (tmp_path / "c.onnx").exists()


def test_recovery_flags_reach_the_summary_and_change_only_what_they_should(tmp_path, npz_dir):
    plain, fixed, again = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    assert cli("quantize", MODEL, "-o", plain, "--calib", npz_dir, "-q", "--target", "espdl-s3").returncode == 0
    r = cli("quantize", MODEL, "-o", fixed, "--calib", npz_dir, "--target", "espdl-s3", "--cle", "--bias-correction",
            "--gptq")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("recovery")]
    assert [line.split(":")[0].split()[-1] for line in lines] == ["CLE", "GPTQ", "correction"], r.stdout
    assert fixed.read_bytes() != plain.read_bytes()
    r = cli("quantize", MODEL, "-o", again, "--calib", npz_dir, "-q", "--target", "espdl-s3", "--cle",
            "--bias-correction", "--gptq")
    assert again.read_bytes() == fixed.read_bytes()  # same inputs, same bytes
    bad = cli("quantize", MODEL, "-o", tmp_path / "d.onnx", "--calib", npz_dir, "--gptq", "--adaround")
    assert bad.returncode == 2 and "not both" in bad.stderr and not (tmp_path / "d.onnx").exists()
    bad = cli("quantize", MODEL, "-o", tmp_path / "d.onnx", "--calib", npz_dir, "--smoothquant", "3")
    assert bad.returncode == 2 and "[0, 1]" in bad.stderr
    for flags, fmt, says in ((["--cle"], "cali-table", "rescaled"), (["--gptq"], "edgequant", "plain rounding")):
        bad = cli("quantize", MODEL, "-o", tmp_path / "d.onnx", "--calib", npz_dir, *flags,
                  "--export-params", f"{fmt}:{tmp_path / 'p.txt'}")
        assert bad.returncode == 2 and says in bad.stderr and not list(tmp_path.glob("[dp].*"))
    ok = cli("quantize", MODEL, "-o", tmp_path / "d.onnx", "--calib", npz_dir, "-q", "--bias-correction",
             "--export-params", f"qparams:{tmp_path / 'q.json'}")
    assert ok.returncode == 0 and (tmp_path / "q.json").is_file()  # ranges only: the toolchain rounds weights


def test_config_file_python_m_and_default_output(tmp_path, npz_dir):
    model = tmp_path / "net.onnx"
    model.write_bytes(MODEL.read_bytes())
    cfg = {
        "model_parameters": {"onnx_model": str(model)},
        "calibration_parameters": {"calibration_step": 20, "calibration_type": "percentile",
                                   "input_parametres": [{"input_name": "image", "file_type": "npz",
                                                         "data_list_path": str(npz_dir)}]},
        "quantization_parameters": {"max_percentile": 0.999},
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    r = cli("-c", path, "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "net.q.onnx").is_file()
    out = tmp_path / "other.onnx"
    r = cli("quantize", "-c", path, "-i", model, "-o", out, "-q", "--method", "minmax")
    assert r.returncode == 0, r.stderr
    assert out.is_file()


def error_case(tmp_path, *args, match):
    out = tmp_path / "never.onnx"
    r = cli("quantize", *args, "-o", out, "-q") if "-o" not in args else cli("quantize", *args, "-q")
    assert r.returncode not in (0, 1), (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert match in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_missing_and_corrupt_model(tmp_path, npz_dir):
    error_case(tmp_path, tmp_path / "nope.onnx", "--calib", npz_dir, match="model file not found")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    error_case(tmp_path, bad, "--calib", npz_dir, match="not a readable ONNX model")
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(MODEL.read_bytes()[:5000])
    error_case(tmp_path, truncated, "--calib", npz_dir, match="ONNX")
    ext = tmp_path / "ext.onnx"
    onnx.save(onnx.load(str(MODEL)), str(ext), save_as_external_data=True, location="ext.data", size_threshold=0)
    data = (tmp_path / "ext.data").read_bytes()
    (tmp_path / "ext.data").write_bytes(data[:1000])
    error_case(tmp_path, ext, "--calib", npz_dir, match="the external data file ext.data is truncated (1000 bytes")
    (tmp_path / "ext.data").unlink()
    error_case(tmp_path, ext, "--calib", npz_dir, match="keeps its data in ext.data, which is not beside the model")


def test_data_errors(tmp_path, npz_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    error_case(tmp_path, MODEL, "--calib", empty, match="finds 0 items: looked in")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.savez(wrong / "a.npz", image=np.zeros((1, 1, 32, 32), np.float32))
    error_case(tmp_path, MODEL, "--calib", wrong, match="input 'image' expects shape [?, 1, 28, 28], got [1, 1, 32, 32]")
    nan = tmp_path / "nan"
    nan.mkdir()
    x = np.zeros((1, 1, 28, 28), np.float32)
    x[0, 0, 3, 3] = np.nan
    np.savez(nan / "a.npz", image=x)
    error_case(tmp_path, MODEL, "--calib", nan, match="NaN or Inf")
    error_case(tmp_path, MODEL, "--calib", npz_dir, "--calib", npz_dir, match="2 calibration sources for 1 model inputs")


def test_config_errors(tmp_path, npz_dir):
    def cfg(**sections):
        base = {"model_parameters": {"onnx_model": str(MODEL)}}
        base.update(sections)
        p = tmp_path / "c.json"
        p.write_text(json.dumps(base))
        return p

    error_case(tmp_path, "-c", cfg(calibration_parameters={"calibraton_type": "kl"}), "--calib", npz_dir,
               match="'calibration_parameters.calibraton_type' is not recognised")
    error_case(tmp_path, "-c", cfg(calibration_parameters={"calibration_type": "best"}), "--calib", npz_dir,
               match="calibration type 'best' is not implemented; valid:")
    error_case(tmp_path, "-c", cfg(calibration_parameters={"input_parametres": [{}, {}]}), "--calib", npz_dir,
               match="input_parametres size (2) should equal the model's inputs size (1")
    error_case(tmp_path, "-c", cfg(calibration_parameters={"input_parametres": [{"input_name": "imgae"}]}),
               "--calib", npz_dir, match="did you mean 'image'")
    error_case(tmp_path, "-c", cfg(calibration_parameters={"input_parametres": [{"file_type": "mp4"}]}),
               "--calib", npz_dir, match="file_type 'mp4' not implemented")
    error_case(tmp_path, "-c", cfg(calibration_parameters={"input_parametres": [{"dtype": "int8"}]}),
               "--calib", npz_dir, match="config dtype int8 for input 'image' does not match the model's float32")
    error_case(tmp_path, "-c", cfg(quantization_parameters={"finetune_level": 3}), "--calib", npz_dir,
               match="levels above 2 are not available")
    error_case(tmp_path, "-c", cfg(quantization_parameters={"truncate_var_names": ["logitz"]}), "--calib", npz_dir,
               match="'logitz' is not a tensor of the model; closest:")
    error_case(tmp_path, "-c", cfg(quantization_parameters={"custom_setting": [{"input_names": ["image"]}]}),
               "--calib", npz_dir, match="output_names")
    error_case(tmp_path, "-c", cfg(quantization_parameters={"overrides": ["Conv"]}), "--calib", npz_dir,
               match="must read SELECTOR=PRECISION")


def test_mixed_precision_flags(tmp_path, npz_dir):
    model = onnx.load(str(MODEL))
    last = model.graph.node[-1]
    out = tmp_path / "m.onnx"
    r = cli("quantize", MODEL, "-o", out, "--calib", npz_dir, "--float-after", last.input[0], "--precision-level", "1")
    assert r.returncode == 0, r.stderr
    assert "overrides" in r.stdout
    q = onnx.load(str(out))
    node = next(n for n in q.graph.node if n.name == last.name or (n.op_type == last.op_type and n.output == last.output))
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producers.get(node.input[0]) != "DequantizeLinear"
    error_case(tmp_path, MODEL, "--calib", npz_dir, "--float-before", "nope", match="'nope' is not a tensor")
    error_case(tmp_path, MODEL, "--calib", npz_dir, "--precision-level", "7",
               match="Invalid value for '--precision-level': 7 is not in the range 0<=x<=4")


def test_override_errors(tmp_path, npz_dir):
    error_case(tmp_path, MODEL, "--calib", npz_dir, "--override", "Conv_1=int4", match="precision 'int4'")
    error_case(tmp_path, MODEL, "--calib", npz_dir, "--override", "Convv_1=int16",
               match="matches no node; closest node names:")


def test_unwritable_output(tmp_path, npz_dir):
    error_case(tmp_path, MODEL, "--calib", npz_dir, "-o", tmp_path / "no" / "dir" / "m.onnx",
               match="output folder does not exist")
    error_case(tmp_path, MODEL, "--calib", npz_dir, "-o", MODEL, match="is the input model")


def test_paths_that_name_no_file_and_outputs_no_file_system_takes(tmp_path, npz_dir):
    folder = tmp_path / "models"
    folder.mkdir()
    error_case(tmp_path, folder, "--calib", npz_dir, match=f"model {folder} is a folder, not a file")
    r = cli("-c", folder)
    assert r.returncode == 2 and r.stderr.strip() == f"error: config {folder} is a folder, not a file; give the " \
        "config file itself", r.stderr
    error_case(tmp_path, MODEL, "--calib", npz_dir, "-o", "", match="'--output': is empty; give a path")
    error_case(tmp_path, MODEL, "--calib", npz_dir, "-o", f"{tmp_path}/out/", match="names a folder; give a file name")
    assert not (tmp_path / "out").exists()
    error_case(tmp_path, MODEL, "--calib", npz_dir, "-o", tmp_path / ("a" * 300 + ".onnx"), match="name too long")


def test_a_mistyped_command_is_named_not_taken_for_a_model(tmp_path):
    r = cli("quantise", MODEL.name, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: no command 'quantise'; did you mean 'quantize'? " \
        "(see edgequant --help)", r.stderr
    (tmp_path / "analyse").write_bytes(MODEL.read_bytes())  # a file of that name is a model, as before
    r = cli("analyse", "-o", tmp_path / "m.q.onnx", "--calib", tmp_path / "none", cwd=tmp_path)
    assert "no command" not in r.stderr and "calib" in r.stderr, r.stderr


def test_npz_files_that_are_no_archive_or_hold_pickles(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.npz").write_bytes(np.random.default_rng(0).bytes(3000))
    error_case(tmp_path, MODEL, "--calib", junk, match="a.npz: not a readable .npz file: it is not a zip archive")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    np.savez(pickled / "a.npz", image=np.array([{"x": 1}], dtype=object))
    error_case(tmp_path, MODEL, "--calib", pickled, match="holds Python objects (pickles), which are never loaded")


def test_compare_fails_nan_even_against_nan_and_compares_strings(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, x=np.array([np.nan, 1.0], np.float32), s=np.array(["a", "b"]), y=np.ones(3, np.float32))
    np.savez(b, x=np.array([np.nan, 1.0], np.float32), s=np.array(["a", "c"]), y=np.ones(3, np.float32))
    r = cli("compare", a, b)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    rows = {ln.split("│")[1].strip(): ln for ln in r.stdout.splitlines() if ln.startswith("│")}
    assert set(rows) == {"x", "s"}  # y passes and is not listed
    assert "FAILED not similar (2 NaN/inf)" in rows["x"] and "1.0000" not in rows["x"]
    assert "FAILED not equal" in rows["s"] and "3 compared, 1 passed, 2 failed" in r.stdout
    assert cli("compare", a, a).returncode == 1  # NaN against the very same NaN


def test_demo_runs(tmp_path):
    r = cli("demo", "-q", "-o", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    assert "top-1 accuracy" in r.stdout and (tmp_path / "d" / "mnist_cnn.q.onnx").is_file()
    # it leaves what the next commands need, and the three commands it prints run as printed
    assert len(list((tmp_path / "d" / "calib").glob("*.npz"))) == 10 and (tmp_path / "d" / "digits.npz").is_file()
    lines = r.stdout[r.stdout.index("Next"):].splitlines()[1:]
    commands = [ln.strip() for ln in lines if ln.strip().startswith("edgequant ")]
    assert len(commands) == 3
    for line in commands:
        for part in line.split(" && "):
            step = cli(*part.split()[1:], "-q" if not part.split()[1] == "compare" else "-v", cwd=tmp_path)
            assert step.returncode == 0, (part, step.stdout[-500:], step.stderr[-500:])


def test_shape_specialization_flags(tmp_path):
    from tests.unit.test_specialize import batch_test_model

    model = tmp_path / "branchy.onnx"
    onnx.save(batch_test_model(), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        np.savez(calib / f"{i:02d}.npz", x=rng.standard_normal((1, 4)).astype(np.float32),
                 k=np.array(5 + i % 2, np.int64))  # k varies: the default pins nothing but shapes
    out = tmp_path / "flat.onnx"
    r = cli("quantize", model, "-o", out, "--calib", calib, "--fix-input", "k=5")
    assert r.returncode == 0, r.stderr
    assert "folded 2 If" in r.stdout and "k=5" in r.stdout
    assert not any(n.op_type == "If" for n in onnx.load(str(out)).graph.node)
    r = cli("quantize", model, "-o", tmp_path / "kept.onnx", "--calib", calib, "--no-specialize")
    assert r.returncode == 0 and "folded" not in r.stdout and "If/Loop/Scan bodies" in r.stdout
    bad = cli("quantize", model, "-o", tmp_path / "x.onnx", "--calib", calib, "--input-shape", "nope=1x4")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "not an input of the model" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()
    bad = cli("quantize", model, "-o", tmp_path / "x.onnx", "--calib", calib, "--input-shape", "x")
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr


def test_written_files_get_the_umask_mode_are_synced_and_sigterm_leaves_nothing_half_done(tmp_path, npz_dir):
    """Files are created as a plain write would (0666 less the umask, not a temporary file's
    0600), an overwritten file keeps its own mode, report folders are not 0700; SIGTERM unwinds
    like Ctrl-C (exit 143, the temporary file gone)."""
    import os
    import stat

    from edgequant.cli.main import Terminated
    from edgequant.ir.model import write_atomic

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(0o022)
    try:
        out = tmp_path / "m.q.onnx"
        r = cli("quantize", MODEL, "-o", out, "--calib", npz_dir, "-q", "--export-params", f"qparams:{tmp_path / 'q.json'}",
                "--analyze", "--report-dir", tmp_path / "rep")
        assert r.returncode == 0, r.stderr
        assert mode(out) == mode(tmp_path / "q.json") == 0o644 and mode(tmp_path / "rep") == 0o755
        os.chmod(out, 0o640)
        assert cli("quantize", MODEL, "-o", out, "--calib", npz_dir, "-q").returncode == 0
        assert mode(out) == 0o640  # replaced, its mode kept
    finally:
        os.umask(old)

    def killed(tmp):
        raise Terminated()

    with pytest.raises(Terminated):
        from edgequant.ir.model import _replace_atomically

        _replace_atomically(tmp_path / "x.bin", tmp_path, killed)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.bin")]
    assert write_atomic(tmp_path / "x.bin", b"1").read_bytes() == b"1"
    code = ("import os, signal, time\nimport edgequant.cli.main as m\n"
            "@m.cli.command('selfterm')\ndef selfterm():\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(10)\n"
            "m.main(['selfterm'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143 and "terminated" in done.stderr and "Traceback" not in done.stderr


def test_side_outputs_that_cannot_be_written_fail_before_any_work(tmp_path, npz_dir):
    """A parameter file in a missing folder or naming a folder, or a report folder under a
    missing parent: exit 2 at once, and no model written."""
    out = tmp_path / "m.q.onnx"
    for extra in (["--export-params", f"qparams:{tmp_path / 'nope' / 'q.json'}"],
                  ["--export-params", f"qparams:{tmp_path}"],
                  ["--analyze", "--report-dir", tmp_path / "nope" / "rep"]):
        r = cli("quantize", MODEL, "-o", out, "--calib", npz_dir, "-q", *extra)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)
        assert not out.exists()
    assert cli("quantize", MODEL, "-o", tmp_path, "--calib", npz_dir, "-q").returncode == 2  # -o a folder


def test_if_branches_that_stay_are_quantized_unless_float_bodies(tmp_path):
    import onnx

    from tests.unit.test_bodies import _branch_ops, _model, _samples

    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, x in enumerate(_samples(24)):
        np.save(calib / f"{i:03d}.npy", x)
    for flag in (False, True):
        out = tmp_path / f"q{flag}.onnx"
        done = cli("quantize", path, "-o", out, "--calib", calib, *(["--float-bodies"] if flag else []))
        assert done.returncode == 0, done.stderr
        ops = _branch_ops(onnx.load(str(out)))
        assert ("QuantizeLinear" in ops["then_branch"]) is not flag
        assert ("then branch quantized on the" in done.stdout) is not flag, done.stdout
