"""``analyze``: where a quantized model loses accuracy, per tensor and per layer.

Returns an ``ErrorReport``; ``write_report`` (analysis.report) turns it into files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto

from edgequant.analysis.graphwise import TensorError, clip_range, graphwise, tensor_samples
from edgequant.analysis.layerwise import LayerError, float_cache, layerwise
from edgequant.analysis.qdq_map import QuantMap, read_quant_map, weight_match_score
from edgequant.data.inputs import InputSettings, model_inputs
from edgequant.data.open import open_calibration
from edgequant.errors import CalibrationDataError, ConfigError, ModelLoadError
from edgequant.ir.model import ensure_opset, load_model, opset_of
from edgequant.passes.pipeline import prepare_model
from edgequant.planning.overrides import FLOAT, Override
from edgequant.planning.plan import name_nodes
from edgequant.quant.dtypes import QuantDType

#: Samples whose values the histograms show (at most 200,000 values a tensor).
HISTOGRAM_SAMPLES = 16

Progress = Callable[[str, int, int], None]
MODES = ("graphwise", "layerwise", "both")


@dataclass
class ErrorReport:
    """Per-tensor (graphwise) and per-layer (layerwise) errors of a quantized model.

    ``graphwise``: every quantized activation of the quantized model against float, in graph
    order (error accumulated along depth). ``layerwise``: each layer quantized alone, the rest
    float (which layers cause the error). ``outputs``: the model outputs end to end.
    """

    graphwise: list[TensorError] = field(default_factory=list)
    layerwise: list[LayerError] = field(default_factory=list)
    outputs: list[TensorError] = field(default_factory=list)
    samples: int = 0
    layerwise_samples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    clip_ranges: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)  # what Q/DQ can represent
    histogram_samples: int = 0

    def worst_layers(self, n: int = 10) -> list[LayerError]:
        """Layers whose own quantization hurts the model output most (lowest output cosine)."""
        return sorted(self.layerwise, key=lambda r: r.output.badness, reverse=True)[:n]

    def worst_tensors(self, n: int = 10) -> list[TensorError]:
        return sorted(self.graphwise, key=lambda r: r.metrics.badness, reverse=True)[:n]

    def fixes(self, n: int = 5, precision: QuantDType = QuantDType.INT16, can_float: bool = True) -> list[Override]:
        """Overrides for the ``n`` worst flagged layers (see ``suggest_overrides``)."""
        return suggest_overrides(self.worst_layers(n), precision, can_float)


def suggest_overrides(ranked: list[LayerError], precision: QuantDType = QuantDType.INT16,
                      can_float: bool = True) -> list[Override]:
    """``NODE=PRECISION`` for each flagged layer of ``ranked`` (worst first): ``precision``
    (16-bit), or float — where the target runs float — for a layer whose quantized input makes
    it produce inf/NaN (a Log or Rsqrt of an input rounded to zero)."""
    return [Override(r.node, FLOAT if can_float and (r.output.nonfinite or r.local.nonfinite) else precision)
            for r in ranked if r.output.flagged or r.local.flagged]


def analyze(float_model: str | os.PathLike | ModelProto, quant_model: str | os.PathLike | ModelProto,
            calibration, *, mode: str = "both", num_samples: int = 32, histograms: int = 4,
            input_settings: list[InputSettings] | None = None, progress: Progress | None = None,
            cache_budget_mb: int = 1024, device: str = "cpu",
            transform_fn: Callable[[Any], Any] | None = None, example_inputs: Any = None,
            input_shapes: Any = None, layout: str | None = None) -> ErrorReport:
    """Compare ``quant_model`` (QDQ) with ``float_model`` on ``num_samples`` calibration samples.

    ``float_model`` may be the model as given to the quantizer or the prepared one
    (``QuantizeResult.float_model``); a given model is also prepared the way ``quantize`` does
    (BatchNorm folded...) and the form whose weights match the quantized model is used. A
    PyTorch model (``nn.Module``, TorchScript file, ``ExportedProgram``) is exported first, as
    ``quantize`` exports it: on ``example_inputs`` or at ``input_shapes``, in ``layout``.
    """
    from edgequant.api import onnx_model

    float_model = onnx_model(float_model, example_inputs, layout,
                             changes={"input_shapes": input_shapes} if input_shapes else None)
    if mode not in MODES:
        raise ConfigError(f"analysis mode {mode!r} is not one of {', '.join(MODES)}")
    if num_samples < 1:
        raise ConfigError(f"number of analysis samples must be ≥ 1, got {num_samples}")
    qmodel = load_model(quant_model)
    fmodel, qmap = _float_side(load_model(float_model), qmodel)
    if not len(qmap):
        raise ModelLoadError("the quantized model has no QuantizeLinear/DequantizeLinear on any node of the "
                             "float model; give the float model it was quantized from")
    source = open_calibration(calibration, model_inputs(fmodel), input_settings, 1, transform_fn)
    count = min(num_samples, len(source))
    if count == 0:
        raise CalibrationDataError("the calibration data yields 0 samples")
    report = ErrorReport(samples=count)

    def take(n: int):
        return source.samples(0, n)

    t0 = time.perf_counter()
    if mode in ("graphwise", "both"):
        report.graphwise, report.outputs = graphwise(fmodel, qmodel, qmap, take(count), count, progress, device)
        worst = [r for r in report.worst_tensors(histograms) if r.metrics.snr > 0]
        if worst:
            report.histograms = tensor_samples(fmodel, qmodel, worst, take(min(count, HISTOGRAM_SAMPLES)),
                                               device=device)
            report.histogram_samples = min(count, HISTOGRAM_SAMPLES)
            report.clip_ranges = {r.name: rng for r in worst if (rng := clip_range(qmodel, r.quant_name))}
        report.seconds["graphwise"] = time.perf_counter() - t0
    if mode in ("layerwise", "both"):
        t1 = time.perf_counter()
        cache = float_cache(fmodel, take(count), cache_budget_mb << 20, device)
        report.layerwise_samples = len(cache)
        if len(cache) < count:
            report.notes.append(f"layerwise view on {len(cache)} of {count} samples: the float tensors of more "
                                f"would exceed the {cache_budget_mb} MB cache")
        report.layerwise = layerwise(fmodel, qmodel, qmap, cache, progress, device)
        report.seconds["layerwise"] = time.perf_counter() - t1
    return report


def _float_side(given: ModelProto, qmodel: ModelProto) -> tuple[ModelProto, QuantMap]:
    """The float model the QDQ model's weights came from: as given, or prepared like quantize."""
    target = opset_of(qmodel)
    base = ensure_opset(given, target) if opset_of(given) < target else given
    prepared = ModelProto()
    prepared.CopyFrom(base)
    prepare_model(prepared, simplify=True)
    name_nodes(prepared)
    candidates = []
    for model in (base, prepared):
        qmap = read_quant_map(model, qmodel)
        candidates.append((weight_match_score(model, qmodel, qmap), len(qmap), model, qmap))
    best = max(candidates, key=lambda c: (c[0], c[1]))
    return best[2], best[3]
