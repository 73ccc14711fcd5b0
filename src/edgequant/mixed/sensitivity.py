"""Layer sensitivity: the damage each layer's own quantization does to the model output,
measured on held-out samples with the layerwise (isolated) analysis, worst first."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from edgequant.analysis.layerwise import LayerError, float_cache, layerwise
from edgequant.analysis.qdq_map import read_quant_map
from edgequant.calibrated import CalibratedModel

Progress = Callable[[str, int, int], None]


@dataclass
class Sensitivity:
    """Layers ranked worst first, the float tensors of the samples used, and the time taken."""

    layers: list[LayerError]
    cache: list[dict[str, np.ndarray]]
    seconds: float

    def ranked(self) -> list[LayerError]:
        return sorted(self.layers, key=lambda r: r.output.badness, reverse=True)


def sensitivity(state: CalibratedModel, qmodel: ModelProto, progress: Progress | None = None,
                cache_budget_mb: int = 1024, samples: int | None = None) -> Sensitivity:
    """Rank the layers of ``qmodel`` (assembled from ``state``) on the samples the fidelity
    check uses, or on the first ``samples`` of all (calibration and held-out) when given.
    The layers are evaluated through the state's executor (in process, worker processes or
    a Ray cluster): the ranking is the same whichever runs them."""
    t0 = time.perf_counter()
    first, count = state.split.eval_range
    if samples is not None:
        first, count = 0, state.split.first(samples)
    cache = float_cache(state.model, state.samples(first, max(count, 1)), cache_budget_mb << 20,
                        state.options.device)
    qmap = read_quant_map(state.model, qmodel)
    rows = layerwise(state.model, qmodel, qmap, cache, progress, state.options.device, state.executor())
    return Sensitivity(rows, cache, time.perf_counter() - t0)
