"""More real pretrained models, run as a user would (CLI, a folder of .npz, defaults).

* silero-vad (op15): a voice-activity RNN with an LSTM, a state input [2, 1, 128] and a
  scalar sample-rate input; inputs are audio chunks (speech-like tones and noise).
* magika: a file-type classifier whose input is int32 bytes; inputs are real files' bytes
  (Python sources and compiled modules shipped with numpy).
No labels are needed for what is asserted here: a valid model that onnxruntime runs, and
outputs compared with float on samples it did not calibrate on. magika is one of the models
plain int8 breaks (its decomposed layer norms square small differences): with defaults it
runs but its top-1 agrees with float on only part of the files, and ``--activation-dtype
int16`` restores it — the case automatic mixed precision is for.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from tests.conftest import extract, run
from tests.integration.realdata import labelled_files


def audio_chunks(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    t = np.arange(512) / 16000.0
    out = []
    for i in range(n):
        f0 = rng.uniform(90, 300)
        voiced = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
        x = (voiced * rng.uniform(0.0, 0.5) * (i % 3 != 0) + rng.standard_normal(512) * 0.02).astype(np.float32)
        out.append({"input": x[None], "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)})
    return out


def file_bytes(n: int, seed: int) -> list[dict]:
    """Features of real files (Python, ELF, C headers shipped with numpy); seed picks the half."""
    return [{"bytes": f} for _, f in labelled_files(n // 3 + 1, part=seed % 2)][:n]


CASES = {
    "silero-vad": ("silero_vad", "silero_vad/data/silero_vad_16k_op15.onnx", audio_chunks),
    "magika": ("magika", "magika/models/standard_v3_3/model.onnx", file_bytes),
}


def quantize_cli(case: str, tmp_path: Path, *flags: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    key, member, make = CASES[case]
    model = extract(key, member)
    calib = tmp_path / "calib"
    if not calib.exists():
        calib.mkdir()
        for i, feed in enumerate(make(40, seed=1)):
            np.savez(calib / f"{i:03d}.npz", **feed)
    out = tmp_path / f"q{len(flags)}.onnx"
    r = subprocess.run([sys.executable, "-m", "edgequant", "quantize", str(model), "-o", str(out),
                        "--calib", str(calib), *flags], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "cosine" in r.stdout
    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized)
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    return onnx.load(str(model)), quantized


def test_voice_activity_rnn_with_state_and_scalar_inputs(tmp_path):
    from edgequant.analysis import cosine

    original, quantized = quantize_cli("silero-vad", tmp_path)
    for feed in audio_chunks(9, seed=2):
        (p_ref, state_ref), (p_q, state_q) = run(original, feed), run(quantized, feed)
        assert abs(float(p_ref.ravel()[0]) - float(p_q.ravel()[0])) < 0.05
        assert cosine(state_ref, state_q) > 0.9


def test_integer_input_classifier_runs_and_int16_restores_it(tmp_path):
    original, int8 = quantize_cli("magika", tmp_path)
    _, int16 = quantize_cli("magika", tmp_path, "--activation-dtype", "int16")
    feeds = file_bytes(40, seed=2)
    ref = [run(original, f)[0].argmax() for f in feeds]
    agree8 = np.mean([run(int8, f)[0].argmax() == r for f, r in zip(feeds, ref)])
    agree16 = np.mean([run(int16, f)[0].argmax() == r for f, r in zip(feeds, ref)])
    assert agree16 >= 0.975 and agree16 > agree8
