"""A model run as a chain of sessions gives the outputs of one session, bit for bit."""

import numpy as np
import pytest

import edgequant
from edgequant.runtime.segments import split_model
from edgequant.runtime.session import _create, make_session
from tests.unit.test_quantize_graphs import calib, cnn


def _chained(model, size, outputs=None):
    outputs = outputs or [o.name for o in model.graph.output]
    return split_model(model, list(model.graph.node), outputs, lambda part: _create(part, "cpu", 0), size=size)


@pytest.mark.parametrize("size", [3, 5, 8])
def test_a_qdq_model_in_stretches_matches_one_session(size, rng):
    r = edgequant.quantize(cnn(rng), calib(rng), method="minmax")
    chained = _chained(r.model, size)
    assert chained is not None and len(chained.stretches) > 1
    one = _create(r.model, "cpu", 0)
    for x in calib(rng, 4):
        a, b = chained.run(None, {"x": x}), one.run(None, {"x": x})
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
    # a DequantizeLinear read across a cut is repeated there: only integer tensors cross
    crossing = {t for s in chained.stretches[1:] for t in s.inputs}
    producers = {o: n.op_type for n in r.model.graph.node for o in n.output}
    assert crossing and all(producers.get(t) != "DequantizeLinear" for t in crossing)


def test_exposed_tensors_and_ort_values_through_stretches(rng):
    r = edgequant.quantize(cnn(rng), calib(rng), method="minmax")
    inner = [n.output[0] for n in r.float_model.graph.node]
    chained = _chained(r.float_model, 2, inner + [o.name for o in r.float_model.graph.output])
    one = make_session(r.float_model, inner)
    x = calib(rng, 1)[0]
    names = [o.name for o in one.get_outputs()]
    assert [p.name for p in chained.get_inputs()] == ["x"]
    a = chained.run(names, {"x": x})
    assert all(np.array_equal(u, v) for u, v in zip(a, one.run(names, {"x": x})))
    import onnxruntime as ort

    via = chained.run_with_ort_values(names, {"x": ort.OrtValue.ortvalue_from_numpy(x)})
    assert all(np.array_equal(u.numpy(), v) for u, v in zip(via, a))
