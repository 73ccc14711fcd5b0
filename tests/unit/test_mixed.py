"""Mixed-precision machinery: MAC costs, the search strategy, the guard on a healthy model."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

import edgequant
from edgequant.analysis.metrics import FidelityAccumulator, decisions_agree, is_distribution
from edgequant.errors import ConfigError
from edgequant.mixed.cost import layer_macs, node_macs
from edgequant.mixed.search import (
    MixedPrecision,
    Step,
    _Search,
    auto_mixed,
    worst_sample_score,
)
from edgequant.planning.overrides import Override
from edgequant.quant.dtypes import QuantDType
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


def test_recurrent_macs_count_every_step_and_gate():

    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=8)
    values = {"x": np.zeros((5, 2, 6)), "y": np.zeros((5, 1, 2, 8)), "W": np.zeros((1, 32, 6)),
              "R": np.zeros((1, 32, 8))}
    assert node_macs(node, values, {}) == 5 * 2 * 32 * (6 + 8)


def _acc(ref, test):
    a = FidelityAccumulator()
    a.update(np.asarray(ref, np.float32), np.asarray(test, np.float32))
    return a


def test_worst_sample_score_judges_scalars_and_quiet_samples_pooled(rng):
    # one probability per sample: each sample's cosine is 1 whatever it says; pooled it is not
    probs = [_acc([[p]], [[q]]) for p, q in [(0.9, 0.9), (0.05, 0.7), (0.95, 0.93)]]
    assert worst_sample_score(probs, "cosine") < 0.9
    # a near-zero state among loud ones: its cosine is noise, judged within the pool
    loud = [rng.standard_normal(64) for _ in range(5)]
    accs = [_acc(x, x + 0.01 * rng.standard_normal(64)) for x in loud]
    quiet = rng.standard_normal(64) * 1e-3
    accs.append(_acc(quiet, quiet + 0.01 * rng.standard_normal(64)))
    assert worst_sample_score(accs, "cosine") > 0.999
    # a loud sample that int8 breaks still decides the score
    accs.append(_acc(loud[0], -loud[0]))
    assert worst_sample_score(accs, "cosine") < 0


def test_class_probabilities_are_recognised_for_the_top1_check(rng):
    logits = rng.standard_normal((1, 40, 30)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert is_distribution(probs)
    assert not is_distribution(logits)  # raw scores: cosine only
    assert not is_distribution(np.array([[0.7]], np.float32))  # one probability: no top-1
    assert not is_distribution(np.abs(logits) / 100)  # in [0, 1] but rows do not sum to 1


def test_a_sample_keeps_its_decisions_only_when_every_decided_row_does():
    ref = np.array([[[0.9, 0.05, 0.05], [0.2, 0.75, 0.05], [0.48, 0.47, 0.05]]], np.float32)  # 3 frames
    assert decisions_agree(ref, ref + 0.01)
    flipped_tie = ref.copy()
    flipped_tie[0, 2] = [0.46, 0.49, 0.05]  # the float model was undecided there: no decision lost
    assert decisions_agree(ref, flipped_tie)
    flipped = ref.copy()
    flipped[0, 1] = [0.6, 0.35, 0.05]  # one decided frame of three changes its class
    assert not decisions_agree(ref, flipped)


class FakeSearch(_Search):
    """The search strategy alone: a plan is the set of layers; the score is the share of the
    needed layers present (those in ``need_float`` count only in float)."""

    def __init__(self, needed, share, need_float=()):
        super().__init__(None, None, 1.0, share, "int16", None)
        self.needed, self.need_float = set(needed), set(need_float)

    def value(self, layers):
        key = self.overrides(layers)
        if key not in self.scores:
            got = {n for n in layers if n not in self.need_float or self.precision.get(n) == "float"}
            self.scores[key] = len(self.needed & got) / max(len(self.needed), 1)
            self.steps.append(Step(key, self.cost(layers), self.scores[key], self.scores[key] >= 1))
        return self.scores[key]


def test_search_finds_a_small_sufficient_set_within_budget():
    order = [f"L{i}" for i in range(20)]
    share = {n: 0.01 for n in order}
    s = FakeSearch({"L0", "L5", "L6"}, share)
    chosen = s.run(order, budget=0.5)
    assert set(chosen) == {"L0", "L5", "L6"}
    assert len(s.steps) < 20  # geometric growth + bisection + pruning, not one model per layer
    over = FakeSearch({"L0", "L19"}, share)
    best = over.run(order, budget=0.05)  # L19 is beyond the budget: the best found within it
    assert "L19" not in best and "L0" in best and over.cost(best) <= 0.05 + 1e-9
    assert FakeSearch(set(), share).run(order, 0.1) == []


def test_search_skips_a_layer_too_dear_for_the_budget():
    order = ["A", "BIG", "C"]
    s = FakeSearch({"A", "C"}, {"A": 0.01, "BIG": 0.5, "C": 0.01})
    assert s.run(order, budget=0.1) == ["A", "C"]


def test_search_escalates_to_float_what_16_bits_do_not_rescue():
    order = [f"L{i}" for i in range(8)]
    share = {n: 0.01 for n in order}
    s = FakeSearch({"L1", "L2", "L4"}, share, need_float={"L1", "L2"})  # a pair: neither helps alone
    chosen = s.run(order, budget=0.5, escalate=True)
    assert set(chosen) == {"L1", "L2", "L4"}
    assert {str(o) for o in s.overrides(chosen)} == {"L1=float", "L2=float", "L4=int16,weight=int16"}  # only what needs it
    assert s.value(chosen) == 1.0
    no = FakeSearch({"L1", "L2", "L4"}, share, need_float={"L1", "L2"})
    assert no.value(no.run(order, budget=0.5)) < 1.0  # without escalation (target without float)


def test_result_files_and_argument_checks(tmp_path):
    one = (Override.parse("Conv_0=int16"),)
    mp = MixedPrecision(one, 0.02, 0.995, 0.99, "cosine", True, [Step((), 0.0, 0.5, False), Step(one, 0.02, 0.995, True)])
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


def test_search_judges_every_sample_when_the_layer_cache_is_cut_short(rng, monkeypatch):
    from edgequant.mixed import search

    real = search.sensitivity
    monkeypatch.setattr(search, "sensitivity", lambda *a, **k: real(*a, **k, cache_budget_mb=0))
    seen = []
    init = search._Scorer.__init__

    def spy(self, state, job, *args):
        seen.append(len(job.references))
        init(self, state, job, *args)

    monkeypatch.setattr(search._Scorer, "__init__", spy)
    auto_mixed(cnn(rng), calib(rng, 30))
    assert seen == [30]  # the layerwise cache held one sample; the search still sees all 30


def test_a_16_bit_fallback_widens_weights_only_where_the_target_runs_them():
    wide = FakeSearch(set(), {"L0": 0.1})
    assert wide.overrides(["L0"]) == (Override.parse("L0=int16,weight=int16"),)
    narrow = _Search(None, None, 1.0, {"L0": 0.1}, "int16", None, QuantDType.INT8)  # NeuroPilot 8w16a
    assert narrow.overrides(["L0"]) == (Override.parse("L0=int16"),)
    mixed = MixedPrecision(wide.overrides(["L0"]) + (Override.parse("L1=float"),), 0.1, 1.0, 0.99, "cosine", True)
    assert mixed.layers == ("L0", "L1")
    from edgequant.targets import get_target

    assert get_target("neuropilot").fallback_weight == QuantDType.INT8
    assert get_target("espdl").fallback_weight == QuantDType.INT16


def test_search_keeps_16_bits_when_float_scores_no_better():
    class FloatHurts(FakeSearch):  # float costs fidelity here (int8 clipping hid damage downstream)
        def value(self, layers):
            key = self.overrides(layers)
            if key not in self.scores:
                floats = sum(self.precision.get(n) == "float" for n in layers)
                self.scores[key] = 0.5 * len(self.needed & set(layers)) / len(self.needed) - 0.1 * floats
                self.steps.append(Step(key, self.cost(layers), self.scores[key], False))
            return self.scores[key]

    order = [f"L{i}" for i in range(6)]
    s = FloatHurts({"L0", "L1"}, {n: 0.01 for n in order})
    chosen = s.run(order, budget=0.5, escalate=True)
    assert set(chosen) >= {"L0", "L1"} and not s.precision  # unreached either way: the better choice
    assert all(str(o).endswith("=int16,weight=int16") for o in s.overrides(chosen))


def test_search_out_of_reach_keeps_only_the_float_layers_that_score():
    order = [f"L{i}" for i in range(8)]
    s = FakeSearch({"L1", "L2", "L4", "X"}, {n: 0.01 for n in order}, need_float={"L1"})  # X: never offered
    chosen = s.run(order, budget=0.5, escalate=True)
    assert {"L1", "L2", "L4"} <= set(chosen) and s.value(chosen) == 0.75
    assert {str(o) for o in s.overrides(chosen) if o.precision == "float"} == {"L1=float"}


def test_a_layer_is_charged_the_macs_of_the_compute_ops_whose_inputs_it_widens(rng):
    from edgequant.mixed.search import charged_macs
    from edgequant.passes import prepare_model
    from edgequant.planning import QuantOptions, build_plan

    m = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 3, 8, 8] z) {
        a = MaxPool <kernel_shape = [1, 1]> (x)
        y = Conv <pads = [1, 1, 1, 1]> (a, W)
        z = Sigmoid (a)
    }
    """, check=False)
    m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"))
    prepare_model(m)
    for k, n in enumerate(m.graph.node):
        n.name = f"{n.op_type}_{k}"
    plan = build_plan(m, QuantOptions())
    assert "a" in plan.activations
    values = {"x": np.zeros((1, 3, 8, 8)), "a": np.zeros((1, 3, 8, 8)), "y": np.zeros((1, 4, 8, 8)),
              "z": np.zeros((1, 3, 8, 8))}
    names = ["MaxPool_0", "Conv_1", "Sigmoid_2"]
    macs = layer_macs(m, values, names)
    conv = 4 * 8 * 8 * 3 * 3 * 3
    assert macs == {"MaxPool_0": 192, "Conv_1": conv, "Sigmoid_2": 192}
    charged = charged_macs(m, plan, macs, names)
    # a 16-bit Sigmoid widens its input a, which the Conv reads too: it pays for the Conv
    assert charged == {"MaxPool_0": 192, "Conv_1": conv, "Sigmoid_2": 192 + conv}


def test_the_search_plot_shows_each_model_as_a_point_and_the_pareto_front():
    from edgequant.mixed.search import MixedPrecision, Step
    from edgequant.planning.overrides import Override

    def step(cost, score):
        return Step((Override(f"n{cost}", "int16"),), cost, score, score >= 0.99)

    steps = [step(0.0, 0.90), step(0.02, 0.95), step(0.03, 0.93), step(0.05, 0.995), step(0.08, 0.99)]
    m = MixedPrecision(steps[3].overrides, 0.05, 0.995, 0.99, "cosine", True, steps)
    # (0.03, 0.93) is beaten by (0.02, 0.95) and (0.08, 0.99) by (0.05, 0.995): off the front
    assert [(s.cost, s.score) for s in m.pareto()] == [(0.0, 0.90), (0.02, 0.95), (0.05, 0.995)]
    assert m.plot_png().startswith(b"\x89PNG")
