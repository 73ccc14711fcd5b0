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


def run_demo(out_dir: Path, progress=None) -> DemoReport:
    data = demo_data()
    model_path = asset("mnist_cnn.onnx")
    t = time.perf_counter()
    result = quantize(model_path, list(data["calib_x"]), num_samples=300, progress=progress)
    seconds = time.perf_counter() - t
    out_dir.mkdir(parents=True, exist_ok=True)
    out = save_model(result.model, out_dir / "mnist_cnn.q.onnx")
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
