"""ESP-DL ``.espdl`` files, the model file that reaches an ESP32, written by esp-ppq's own
exporter (``espdl_job``) from the scales edgequant chose.

esp-ppq 1.3.12 (Espressif's quantizer, with torch) runs in a subprocess: the Python named by
``EDGEQUANT_ESPPQ_PYTHON``, else this one when it has esp-ppq (``pip install "edgequant[espdl]"``).
It reads the prepared float model (BatchNorm folded, shapes fixed), every activation's
power-of-two scale and every weight's per-channel scales as the QDQ model holds them, and the
layers kept in int16; it rounds the weights with those scales and derives the biases itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgequant.errors import ConfigError
from edgequant.ir.model import write_atomic

ESP_PPQ = "esp-ppq==1.3.12"
#: edgequant target → (esp-ppq's target, bits)
PLATFORMS = {"espdl": ("esp32p4", 8), "espdl-s3": ("esp32s3", 8), "espdl-int16": ("esp32p4", 16)}


def esp_ppq_python() -> str:
    """The Python that runs esp-ppq, or a ConfigError saying how to get one."""
    named = os.environ.get("EDGEQUANT_ESPPQ_PYTHON")
    if named:
        if not Path(named).is_file():
            raise ConfigError(f"EDGEQUANT_ESPPQ_PYTHON={named} is not a file; name a Python that has {ESP_PPQ}")
        return named
    if importlib.util.find_spec("esp_ppq") is None:
        raise ConfigError(f"--export-params espdl needs {ESP_PPQ}: pip install \"edgequant[espdl]\", or set "
                          "EDGEQUANT_ESPPQ_PYTHON to a Python that has it")
    return sys.executable


def check_target(target: str) -> None:
    if target not in PLATFORMS:
        raise ConfigError(f"--export-params espdl needs an ESP-DL target (--target {', '.join(PLATFORMS)}), "
                          f"not {target}: its scales must be powers of two")


def static_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with a dynamic leading (batch) dimension set to 1, shape computations folded
    again; any other dynamic dimension is an error naming the input."""
    from edgequant.passes.pipeline import prepare_model

    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {t.name for t in out.graph.initializer}
    for inp in out.graph.input:
        if inp.name in weights:
            continue
        for k, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.dim_value > 0:
                continue
            if k:
                raise ConfigError(f"--export-params espdl: input {inp.name} has a dynamic dimension {k}; give its "
                                  f"shape with --input-shape {inp.name}=DIMS")
            d.ClearField("dim_param")
            d.dim_value = 1
    out.graph.ClearField("value_info")
    prepare_model(out)
    return out


def spec(result) -> dict:
    """What ``espdl_job`` needs: esp-ppq's target and bits, activation scales, weight scales
    (per channel, as the QDQ model holds them), the layers kept in 16 bits."""
    check_target(result.options.target)
    target, bits = PLATFORMS[result.options.target]
    plan = result.plan
    acts = {t: float(np.asarray(result.params[a.root].scale).reshape(-1)[0]) for t, a in plan.activations.items()}
    float_nodes = {n.name: n for n in result.float_model.graph.node}
    for name, into in plan.fused.items():  # esp-ppq folds a bias Add into its Conv under the Conv's output name
        conv, add = float_nodes.get(name), float_nodes.get(into)
        if conv is not None and add is not None and add.op_type == "Add" and add.output[0] in acts:
            acts.setdefault(conv.output[0], acts[add.output[0]])
    inits = {t.name: t for t in result.model.graph.initializer}
    prod = {o: n for n in result.model.graph.node for o in n.output}
    qdq_nodes = {n.name: n for n in result.model.graph.node}
    weights = {}
    for (name, slot), wp in plan.weight_items():
        node = qdq_nodes.get(name)
        dq = prod.get(node.input[slot]) if node is not None and slot < len(node.input) else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[1] in inits:
            weights[wp.tensor] = [float(v) for v in numpy_helper.to_array(inits[dq.input[1]]).reshape(-1)]
    wide = [n for n, p in plan.precision.items() if p.split(",")[0] in ("int16", "uint16")]
    return {"target": target, "bits": bits, "activations": acts, "weights": weights, "int16": wide}


def write(result, path: str | os.PathLike) -> Path:
    """The ``.espdl`` file of ``result`` at ``path`` (atomically), via esp-ppq."""
    python = esp_ppq_python()
    job = spec(result)
    with tempfile.TemporaryDirectory(prefix="edgequant-espdl-") as tmp:
        model_path, spec_path, out = Path(tmp) / "model.onnx", Path(tmp) / "spec.json", Path(tmp) / "out.espdl"
        onnx.save(static_model(result.float_model), model_path)
        spec_path.write_text(json.dumps(job))
        env = dict(os.environ, PYTHONHASHSEED="0")  # esp-ppq writes tensors in set order: same inputs, same bytes
        done = subprocess.run([python, str(Path(__file__).with_name("espdl_job.py")), str(model_path), str(spec_path),
                               str(out)], capture_output=True, text=True, env=env, cwd=tmp)
        if done.returncode != 0 or not out.is_file():
            error = Path(str(out) + ".error")
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            why = error.read_text().strip() if error.is_file() else (lines[-1] if lines else "no message")
            raise ConfigError(f"esp-ppq could not write the .espdl file: {why}")
        return write_atomic(path, out.read_bytes())
