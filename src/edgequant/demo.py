"""The bundled example: a small CNN trained on real MNIST digits, quantized end to end."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from edgequant.analysis.metrics import cosine
from edgequant.api import QuantizeResult, quantize
from edgequant.ir.model import save_model
from edgequant.runtime.session import make_session


def asset(name: str) -> Path:
    return Path(str(resources.files("edgequant") / "assets" / name))


def demo_data() -> dict[str, np.ndarray]:
    """Calibration and test digits as float32 NCHW in [0, 1], with labels."""
    with np.load(asset("mnist_samples.npz")) as z:
        data = {k: z[k] for k in z.files}
    for split in ("calib", "test"):
        data[f"{split}_x"] = (data[f"{split}_images"].astype(np.float32) / 255.0)[:, None]
    return data


@dataclass(frozen=True)
class DemoReport:
    float_accuracy: float
    int8_accuracy: float
    output_cosine: float
    float_bytes: int
    int8_bytes: int
    float_ms: float
    int8_ms: float
    quantize_seconds: float
    output: Path
    result: QuantizeResult


def _predict(model, x: np.ndarray) -> tuple[np.ndarray, float]:
    sess = make_session(model, threads=1)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i : i + 100]})[0] for i in range(0, len(x), 100)])
    one = x[:1]
    for _ in range(10):
        sess.run(None, {name: one})
    t = time.perf_counter()
    for i in range(200):
        sess.run(None, {name: x[i : i + 1]})
    return logits, (time.perf_counter() - t) / 200 * 1000


def write_examples(out_dir: Path, data: dict[str, np.ndarray]) -> None:
    """What the next commands need, beside the quantized model: the float model, its 300
    calibration digits (``calib/``, 10 files of 30) and 16 test digits (``digits.npz``)."""
    from edgequant.data.npz import save_npz
    from edgequant.ir.model import write_atomic

    write_atomic(out_dir / "mnist_cnn.onnx", asset("mnist_cnn.onnx").read_bytes())
    (out_dir / "calib").mkdir(exist_ok=True)
    for k in range(0, 300, 30):
        save_npz(out_dir / "calib" / f"digits_{k:03d}.npz", {"image": data["calib_x"][k:k + 30]})
    save_npz(out_dir / "digits.npz", {"image": data["test_x"][:16]})


def next_commands(out_dir: Path) -> list[str]:
    """Three commands to try on the demo's files."""
    d = str(out_dir)
    return [
        f"edgequant analyze {d}/mnist_cnn.onnx {d}/mnist_cnn.q.onnx --calib {d}/calib -o {d}/report",
        f"edgequant quantize {d}/mnist_cnn.onnx -o {d}/mnist_cnn.s3.onnx --calib {d}/calib --target espdl-s3 "
        f"--cle --bias-correction",
        f"edgequant run {d}/mnist_cnn.onnx --inputs {d}/digits.npz --dump-all -o {d}/f.npz && edgequant run "
        f"{d}/mnist_cnn.q.onnx --inputs {d}/digits.npz --dump-all -o {d}/q.npz && edgequant compare {d}/f.npz "
        f"{d}/q.npz --preset int8",
    ]


def run_demo(out_dir: Path, progress=None) -> DemoReport:
    data = demo_data()
    model_path = asset("mnist_cnn.onnx")
    t = time.perf_counter()
    result = quantize(model_path, list(data["calib_x"]), num_samples=300, progress=progress)
    seconds = time.perf_counter() - t
    out_dir.mkdir(parents=True, exist_ok=True)
    out = save_model(result.model, out_dir / "mnist_cnn.q.onnx")
    write_examples(out_dir, data)
    f_logits, f_ms = _predict(result.float_model, data["test_x"])
    q_logits, q_ms = _predict(result.model, data["test_x"])
    labels = data["test_labels"]
    return DemoReport(
        float_accuracy=float((f_logits.argmax(1) == labels).mean()),
        int8_accuracy=float((q_logits.argmax(1) == labels).mean()),
        output_cosine=cosine(f_logits, q_logits),
        float_bytes=model_path.stat().st_size,
        int8_bytes=out.stat().st_size,
        float_ms=f_ms,
        int8_ms=q_ms,
        quantize_seconds=seconds,
        output=out,
        result=result,
    )
