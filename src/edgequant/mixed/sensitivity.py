"""Layer sensitivity: the damage each layer's own quantization does to the model output,
measured on held-out samples with the layerwise (isolated) analysis, worst first."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from edgequant.analysis.layerwise import LayerError, float_cache, layerwise
from edgequant.analysis.qdq_map import read_quant_map

Progress = Callable[[str, int, int], None]


@dataclass
class Sensitivity:
    """Layers ranked worst first, the float tensors of the samples used, and the time taken."""

    layers: list[LayerError]
    cache: list[dict[str, np.ndarray]]
    seconds: float

    def ranked(self) -> list[LayerError]:
        return sorted(self.layers, key=lambda r: r.output.badness, reverse=True)


def sensitivity(state, qmodel: ModelProto, progress: Progress | None = None,
                cache_budget_mb: int = 1024, samples: int | None = None) -> Sensitivity:
    """Rank the layers of ``qmodel`` (assembled from ``state``, an api.Calibrated) on the
    samples the fidelity check uses, or on the first ``samples`` of all (calibration and
    held-out) when given."""
    t0 = time.perf_counter()
    first, count = state.eval_samples()
    if samples is not None:
        first, count = 0, min(samples, state.n_calib + state.n_eval)
    samples_iter = itertools.islice(state.source.samples(), first, first + max(count, 1))
    cache = float_cache(state.prepared, samples_iter, cache_budget_mb << 20, state.opts.device)
    qmap = read_quant_map(state.prepared, qmodel)
    rows = layerwise(state.prepared, qmodel, qmap, cache, progress, state.opts.device)
    return Sensitivity(rows, cache, time.perf_counter() - t0)
