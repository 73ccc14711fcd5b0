"""Parameter files other toolchains read and write: export what edgequant decided, import
what a user (or another tool) decided, as overrides on the plan.

| format | file | export | import |
|---|---|---|---|
| ``qparams`` | NeuroPilot ``export_qparams_config_file`` JSON | activation dtype, symmetry, min/max | ``"FP"`` → float; dtype; min/max pin the range |
| ``cali-table`` | TPU-MLIR calibration table, ``name threshold min max`` | every activation | pins ranges |
| ``qtable`` | TPU-MLIR quantize table, ``name MODE`` | layers not in the default precision | F32/F16/BF16 → float, INT8 |
| ``acuity`` | Acuity ``customized_quantize_layers:`` YAML | every quantized layer's type | ``dynamic_fixed_point-i16`` → int16, ``float32`` → float… |
| ``edgequant`` | edgequant's own JSON: every tensor's dtype, scale, zero point, axis | all | re-creates the model without calibration |
| ``espdl`` | ESP-DL's ``.espdl`` model, written by esp-ppq from edgequant's scales | the model for the chip | – |
"""

from __future__ import annotations

import os
from pathlib import Path

from edgequant.errors import ConfigError, not_a_file, parse_guarded, read_text
from edgequant.export import acuity, espdl, native, qparams, tpu_mlir
from edgequant.ir.model import write_atomic

FORMATS = ("qparams", "cali-table", "qtable", "acuity", "edgequant", "espdl")


def parse_spec(text: str) -> tuple[str, Path]:
    """``FORMAT:PATH`` → (format, path)."""
    fmt, sep, path = text.partition(":")
    if not sep or fmt not in FORMATS or not path:
        raise ConfigError(f"{text!r} must read FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}")
    return fmt, Path(path)


def check_exportable(fmt: str, recovery, target: str | None = None) -> None:
    """A ConfigError when a ``fmt`` file cannot describe what ``recovery`` (``Recovery``) did.

    CLE and SmoothQuant rescale the float model's tensors per channel, so ranges measured on
    them fit no tensor of the original model a toolchain reads. An ``edgequant`` file re-creates
    weights and biases by plain rounding, so it cannot hold what rounding algorithms and bias
    correction chose. (The other formats carry ranges only; the toolchain rounds its weights.)
    """
    if recovery.cle or recovery.smoothquant is not None:
        raise ConfigError(f"--export-params {fmt}: --cle/--smoothquant rescaled the float model's tensors, so its "
                          "ranges fit no tensor of the original model; export without them (bias correction and "
                          "weight rounding live in the QDQ model)")
    if fmt in ("edgequant", "espdl") and (recovery.rounding or recovery.bias):
        how = "re-creates weights and biases by plain rounding" if fmt == "edgequant" else \
            "holds weights esp-ppq rounds, and biases it derives, itself"
        raise ConfigError(f"--export-params {fmt}: the file {how} and cannot hold those "
                          "--gptq/--adaround/--bias-correction chose; keep the QDQ model instead")
    if fmt == "espdl":
        espdl.esp_ppq_python()
        if target is not None:
            espdl.check_target(target)


def exportable_recovery(recovery, formats):
    """``recovery`` (``Recovery``) less what the parameter files in ``formats`` cannot describe
    (``check_exportable``): what the default repair may add when such files are to be written."""
    import dataclasses

    if not formats:
        return recovery
    recovery = dataclasses.replace(recovery, cle=False, smoothquant=None)
    if "edgequant" in formats or "espdl" in formats:
        recovery = dataclasses.replace(recovery, bias_correction=None, adaround=False, gptq=False, finetune_level=0)
    return recovery


def quantized_branches(model) -> int:
    """How many branches of ``model``'s ``If`` nodes hold Q/DQ (``edgequant.bodies``)."""
    from edgequant.ir.graph import direct_bodies

    return sum(any(n.op_type == "QuantizeLinear" for n in g.node)
               for node in model.graph.node if node.op_type == "If" for g in direct_bodies(node))


def export_params(result, fmt: str, path: str | os.PathLike) -> Path:
    """Write ``result``'s parameters in ``fmt`` (atomically). The files describe the enclosing
    graph's tensors: quantized ``If`` branches live in the QDQ model only (the summary says so;
    an ``edgequant`` file, which re-creates the model, is refused)."""
    check_exportable(fmt, result.options.recovery, result.options.target)
    branches = quantized_branches(result.model)
    if branches and fmt in ("edgequant", "espdl"):
        raise ConfigError(f"--export-params {fmt}: {branches} If branches were quantized inside, and the file "
                          "describes the enclosing graph only; quantize with --float-bodies to export it")
    if branches:
        note = (f"the {fmt} file describes the enclosing graph's tensors; the {branches} quantized If branches are "
                "in the QDQ model only")
        if note not in result.summary.notes:
            result.summary.notes.append(note)
    if fmt == "espdl":  # a binary file, written by esp-ppq
        return espdl.write(result, path)
    writer = {"qparams": qparams.dumps, "cali-table": tpu_mlir.dumps_cali_table, "qtable": tpu_mlir.dumps_qtable,
              "acuity": acuity.dumps, "edgequant": native.dumps}[fmt]
    written = write_atomic(path, writer(result))
    if fmt == "qtable":  # what the file cannot say goes into the summary
        result.summary.notes += [n for n in tpu_mlir.qtable_rows(result)[1] if n not in result.summary.notes]
    return written


def import_params(fmt: str, path: str | os.PathLike) -> tuple:
    """Overrides from a parameter file (``edgequant`` files are read by ``native.recreate``)."""
    if fmt == "espdl":
        raise ConfigError("espdl files are written for the chip, not read back; import edgequant:FILE (written "
                          "beside it with --export-params edgequant:FILE) to re-create the model")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(not_a_file("parameter", p))
    text = read_text(p, "parameter")
    reader = {"qparams": qparams.loads, "cali-table": tpu_mlir.loads_cali_table, "qtable": tpu_mlir.loads_qtable,
              "acuity": acuity.loads}.get(fmt)
    if reader is None:
        raise ConfigError(f"{fmt} files re-create a model by themselves: edgequant quantize MODEL --import-params "
                          f"{fmt}:{p} (no calibration needed), alone")
    return parse_guarded(lambda: reader(text, str(p)), p, "parameter")
