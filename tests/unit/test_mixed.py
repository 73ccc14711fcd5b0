"""Mixed-precision machinery: MAC costs, the search strategy, the guard on a healthy model."""

import numpy as np
import pytest
from onnx import numpy_helper

import edgequant
from edgequant.errors import ConfigError
from edgequant.mixed.cost import layer_macs
from edgequant.mixed.search import MixedPrecision, Step, _Search, auto_mixed
from tests.conftest import parse
from tests.unit.test_quantize_graphs import calib, cnn

NET = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] x) => (float[N, 5] y) {
    c = Conv <pads = [1, 1, 1, 1], group = 1> (x, W)
    t = ConvTranspose <strides = [2, 2]> (c, T)
    f = Flatten (t)
    y = Gemm <transB = 1> (f, G)
}
"""


def test_macs_follow_the_formulas(rng):
    m = parse(NET, check=False)
    for name, shape in {"W": (4, 3, 3, 3), "T": (4, 2, 2, 2), "G": (5, 512)}.items():
        m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    values = {"x": np.zeros((1, 3, 8, 8)), "c": np.zeros((1, 4, 8, 8)), "t": np.zeros((1, 2, 16, 16)),
              "f": np.zeros((1, 512)), "y": np.zeros((1, 5))}
    names = [f"{n.op_type}_{i}" for i, n in enumerate(m.graph.node)]
    for n, name in zip(m.graph.node, names):
        n.name = name
    macs = layer_macs(m, values, names)
    assert macs["Conv_0"] == 4 * 8 * 8 * 3 * 3 * 3
    assert macs["ConvTranspose_1"] == 4 * 8 * 8 * 2 * 2 * 2  # every input element × Cout/group × k²
    assert macs["Flatten_2"] == 512 and macs["Gemm_3"] == 5 * 512


class FakeSearch(_Search):
    """The search strategy alone: a plan is the set of layers; the score counts the needed ones."""

    def __init__(self, needed, share):
        super().__init__(None, None, 1.0, share, "int16", None)
        self.needed = set(needed)

    def plan(self, layers):
        return tuple(layers)

    def ok(self, layers):
        key = tuple(layers)
        if key not in self.scores:
            self.scores[key] = len(self.needed & set(layers)) / max(len(self.needed), 1)
            self.steps.append(Step(key, self.cost(layers), self.scores[key], self.scores[key] >= 1))
        return self.scores[key] >= 1


def test_search_finds_a_small_sufficient_set_within_budget():
    order = [f"L{i}" for i in range(20)]
    share = {n: 0.01 for n in order}
    s = FakeSearch({"L0", "L5", "L6"}, share)
    chosen = s.run(order, budget=0.5)
    assert set(chosen) == {"L0", "L5", "L6"}
    assert len(s.steps) < 20  # geometric growth + bisection + pruning, not one model per layer
    over = FakeSearch({"L0", "L19"}, share)
    best = over.run(order, budget=0.05)  # L19 is beyond the budget: best found within it
    assert "L19" not in best and over.cost(best) <= 0.05 + 1e-9
    assert FakeSearch(set(), share).run(order, 0.1) == []


def test_result_files_and_argument_checks(tmp_path):
    mp = MixedPrecision(("Conv_0=int16",), 0.02, 0.995, 0.99, "cosine", True,
                        [Step((), 0.0, 0.5, False), Step(("Conv_0",), 0.02, 0.995, True)])
    yaml_path, png = mp.write(tmp_path / "m")
    assert yaml_path.name == "m.mixed.yaml" and png.read_bytes()[:4] == b"\x89PNG"
    import yaml

    assert yaml.safe_load(yaml_path.read_text())["quantization_parameters"]["overrides"] == ["Conv_0=int16"]
    for kwargs in ({"fallback": "int8"}, {"max_high_precision": 0.0}, {"target_cosine": 0.9, "target_sqnr": 20}):
        with pytest.raises(ConfigError):
            auto_mixed(cnn(np.random.default_rng(0)), calib(np.random.default_rng(0)), **kwargs)


def test_auto_mixed_on_a_healthy_model_keeps_it_int8(rng):
    model, data = cnn(rng), calib(rng, 30)
    result, mixed = auto_mixed(model, data)
    assert mixed.reached and mixed.overrides == () and mixed.cost == 0
    assert result.summary.collapse is None
    assert edgequant.quantize(model, data).summary.collapse is None


def test_auto_mixed_respects_the_target_fallbacks(rng):
    with pytest.raises(ConfigError, match="cannot run float layers"):
        auto_mixed(cnn(rng), calib(rng), target="espdl", fallback="float")
