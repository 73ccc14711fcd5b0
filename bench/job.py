"""One quantization job in its own process, so that peak RSS and wall time are its own.

``python -m bench.job TOOL MODEL CALIB_DIR METHOD N OUT RESULT_JSON [KEYWORDS_JSON]`` (TOOL: edgequant,
``edgequant-generator`` (the samples from a Python generator), ort, ppq)

KEYWORDS_JSON (edgequant only): more ``edgequant.quantize`` keywords, e.g.
``{"target": "espdl-s3", "cle": true}``; with it, weights are per channel or per tensor only
when METHOD says so (``percentile@per-tensor``), so that a ``target`` profile decides otherwise.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np


def _files(calib: Path, n: int) -> list[Path]:
    return sorted(calib.glob("*.npz"))[:n]


def _granularity(method: str) -> tuple[str, bool]:
    """``percentile@per-tensor`` → (``percentile``, per_channel=False); plain names are per channel."""
    name, _, gran = method.partition("@")
    if gran not in ("", "per-channel", "per-tensor"):
        raise SystemExit(f"unknown weight granularity {gran!r}")
    return name, gran != "per-tensor"


def run_edgequant(model: str, calib: Path, method: str, n: int, out: str, options: dict | None = None) -> None:
    import edgequant

    explicit = "@" in method
    method, per_channel = _granularity(method)
    keywords = {"per_channel": per_channel} if options is None or explicit else {}
    keywords.update(options or {})
    if options is not None:  # a recovery setting: calibrate on all n, nothing held out, no repair
        keywords = {"eval_samples": 0, **keywords}
    result = edgequant.quantize(model, [str(calib)], method=method, num_samples=n, **keywords)
    result.save(out)


def run_edgequant_generator(model: str, calib: Path, method: str, n: int, out: str) -> None:
    """edgequant fed by a generator of the first ``n`` samples (one ``.npz`` file read at a
    time, as a user's generator would load them): streamed, never held as a whole."""
    import edgequant

    method, per_channel = _granularity(method)

    def samples():
        for f in _files(calib, n):
            with np.load(f) as z:
                yield {k: z[k] for k in z.files}

    edgequant.quantize(model, samples(), method=method, per_channel=per_channel).save(out)


def run_ort(model: str, calib: Path, method: str, n: int, out: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    files = _files(calib, n)
    method, per_channel = _granularity(method)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(files)

        def get_next(self):
            f = next(self.it, None)
            if f is None:
                return None
            with np.load(f) as z:
                return {k: z[k] for k in z.files}

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise SystemExit(f"onnxruntime has no {method} calibration")
    quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[method],
                    extra_options={"CalibPercentile": 99.99})


def _peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM; ru_maxrss would inherit the parent's across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ppq(model: str, calib: Path, method: str, n: int, out: str) -> None:
    """esp-ppq (Espressif's maintained PPQ) for the onnxruntime platform, on the CPU."""
    try:
        import torch
        from esp_ppq import QuantizationSettingFactory, TargetPlatform
        from esp_ppq.api import export_ppq_graph, quantize_onnx_model
    except ImportError as exc:
        raise SystemExit(f"esp-ppq is not installed in this interpreter ({exc})") from None
    method, per_channel = _granularity(method)
    if not per_channel:
        raise SystemExit("esp-ppq's onnxruntime platform decides the weight granularity itself")
    feeds = []
    for f in _files(calib, n):
        with np.load(f) as z:
            if len(z.files) != 1:
                raise SystemExit("this runner feeds esp-ppq single-input models only")
            feeds.append(torch.from_numpy(z[z.files[0]]))
    algorithms = {"minmax": "minmax", "percentile": "percentile", "entropy": "kl", "mse": "mse"}
    setting = QuantizationSettingFactory.default_setting()
    setting.quantize_activation_setting.calib_algorithm = algorithms[method]
    graph = quantize_onnx_model(onnx_import_file=model, calib_dataloader=feeds, calib_steps=len(feeds),
                                input_shape=list(feeds[0].shape), setting=setting,
                                platform=TargetPlatform.ONNXRUNTIME, device="cpu", verbose=0)
    export_ppq_graph(graph, platform=TargetPlatform.ONNXRUNTIME, graph_save_to=out)


def main(argv: list[str]) -> None:
    tool, model, calib, method, n, out, result, *more = argv
    options = json.loads(more[0]) if more else None
    status, error = "ok", ""
    t = time.perf_counter()
    try:
        runner = {"edgequant": run_edgequant, "edgequant-generator": run_edgequant_generator, "ort": run_ort,
                  "ppq": run_ppq}[tool]
        if options is not None and tool != "edgequant":
            raise SystemExit(f"{tool} takes no edgequant keywords")
        if options is None:
            runner(model, Path(calib), method, int(n), out)
        else:
            run_edgequant(model, Path(calib), method, int(n), out, options)
    except SystemExit as exc:
        status, error = "unsupported", str(exc)
    except BaseException as exc:  # a crash is a result
        status, error = "crash", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        traceback.print_exc()
    seconds = time.perf_counter() - t
    peak_mb = _peak_rss_mb()
    Path(result).write_text(json.dumps({"status": status, "error": error, "seconds": seconds, "peak_rss_mb": peak_mb}))


if __name__ == "__main__":
    main(sys.argv[1:])
