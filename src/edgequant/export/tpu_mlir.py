"""TPU-MLIR files. Calibration table (``run_calibration.py`` output)::

    # comment lines
    NAME THRESHOLD MIN MAX

Quantize table / qtable (``fp_forward.py``, ``--quantize_table``)::

    # op_name quantize_mode
    NAME MODE            MODE: F32, F16, BF16, INT8 (INT4 is not supported here)

In a qtable NAME is a layer's output tensor (TPU-MLIR names ops by their outputs); the node
that writes it (or the node of that name) takes the mode.
"""

from __future__ import annotations

from edgequant.errors import ConfigError, TensorNameError, closest_names
from edgequant.planning.overrides import FLOAT, Override
from edgequant.planning.selectors import ExactTensor, NamePattern
from edgequant.quant.dtypes import QuantDType


def dumps_cali_table(result) -> str:
    lines = ["# edgequant calibration table", "# op_name threshold min max"]
    for name, a in result.plan.activations.items():
        lo, hi = result.ranges[a.root]
        lines.append(f"{name} {max(abs(lo), abs(hi)):.9g} {lo:.9g} {hi:.9g}")
    return "\n".join(lines) + "\n"


def _rows(text: str, origin: str, width: tuple[int, ...]):
    for k, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) not in width:
            raise ConfigError(f"{origin} line {k}: expected {' or '.join(map(str, width))} fields, got {line!r}")
        yield k, parts


def loads_cali_table(text: str, origin: str = "cali-table") -> tuple[Override, ...]:
    out = []
    for k, parts in _rows(text, origin, (2, 4)):
        try:
            values = [float(v) for v in parts[1:]]
        except ValueError:
            raise ConfigError(f"{origin} line {k}: threshold/min/max must be numbers: {' '.join(parts)}") from None
        lo, hi = (values[1], values[2]) if len(values) == 3 else (-abs(values[0]), abs(values[0]))
        out.append(Override(ExactTensor(parts[0]), range=(lo, hi)))
    return tuple(out)


_MODES: dict[str, QuantDType | str] = {"F32": FLOAT, "F16": FLOAT, "BF16": FLOAT, "INT8": QuantDType.INT8}


def dumps_qtable(result) -> str:
    lines = ["# edgequant quantize table", "# op_name quantize_mode"]
    producer = {n.name: (n.output[0] if n.output else n.name) for n in result.float_model.graph.node}
    for node, precision in result.plan.precision.items():
        mode = {"float": "F32", "int8": "INT8"}.get(precision.split(",")[0])
        if mode is None:
            lines.append(f"# {producer.get(node, node)} {precision}: no qtable mode")
            continue
        lines.append(f"{producer.get(node, node)} {mode}")
    return "\n".join(lines) + "\n"


class _LayerByOutput(NamePattern):
    """A qtable name: the node writing that tensor, or the node of that name."""

    def select(self, model):
        for node in model.graph.node:
            if self.text in node.output or node.name == self.text:
                return [node]
        names = [o for n in model.graph.node for o in n.output]
        raise TensorNameError(f"qtable layer {self.text!r} is not in the model; closest: {closest_names(self.text, names)}")


def loads_qtable(text: str, origin: str = "qtable") -> tuple[Override, ...]:
    out = []
    for k, parts in _rows(text, origin, (2,)):
        mode = parts[1].upper()
        if mode not in _MODES:
            hint = " (INT4 weights are not supported yet)" if mode == "INT4" else ""
            raise ConfigError(f"{origin} line {k}: mode {parts[1]!r} is not F32, F16, BF16 or INT8{hint}")
        out.append(Override(_LayerByOutput(parts[0]), _MODES[mode]))
    return tuple(out)
