"""TPU-MLIR files, named as TPU-MLIR 1.30 names its ops.

Calibration table (``run_calibration.py`` output, read by ``model_deploy.py
--calibration_table``)::

    # comment lines
    NAME THRESHOLD MIN MAX

Quantize table / qtable (``--quantize_table``)::

    NAME MODE            MODE: F32, F16, BF16, INT8, INT4 …

NAME is an op of the model TPU-MLIR compiles: its ONNX front end names each op
``<first output>_<OpType>`` and a graph input by its own name, after onnxsim and its own
fusions (``TPU_MLIR_NAMING``; ``op_names``). Rows whose NAME it does not know it ignores without
a word, and it reads a row only when it matches ``\\S+ [-0-9.e]+ [-0-9.e]+ [-0-9.e]+``: no
``+``, no ``E``, no ``inf``. In symmetric mode it reads the threshold and the sign of MIN
(MIN ≥ 0: an unsigned tensor); ``--asymmetric`` reads MIN and MAX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnx import GraphProto

from edgequant.errors import ConfigError, TensorNameError, closest_names
from edgequant.ir.graph import GraphIndex, consumers, producers
from edgequant.planning.overrides import FLOAT, Override
from edgequant.planning.selectors import Graph, NamePattern
from edgequant.quant.dtypes import QuantDType

TPU_MLIR_NAMING = "TPU-MLIR 1.30 (OnnxConverter: <first output>_<OpType>, after onnxsim)"
#: TPU-MLIR's floor for a zero range (``kld_calibrator.py``: thresholds ≤ 1e-5 are written as 1e-5).
THRESHOLD_FLOOR = 1e-5

_FOLDS_BN = ("Conv", "ConvTranspose", "Gemm")


def _bias_shaped(dims, channels: int | None, spatial: int) -> bool:
    """A constant that adds one value per output channel of a Conv (``[C, 1, 1]``, ``[1, C, 1, 1]``)."""
    d = list(dims)
    return channels is not None and len(d) >= spatial + 1 and d[-(spatial + 1)] == channels and \
        all(v == 1 for k, v in enumerate(d) if k != len(d) - spatial - 1)


def op_names(graph: GraphProto) -> dict[str, str]:
    """The TPU-MLIR op name of every tensor of ``graph`` (the user's model, as TPU-MLIR reads
    it), following what ``model_transform.py`` does before it names anything:

    * a graph input keeps its name; every other op is ``<output>_<OpType>``, one name per output;
    * Identity and Dropout vanish (their output is their input's op);
    * a BatchNormalization after a Conv/ConvTranspose/Gemm read by nothing else is folded into
      it (onnxsim): the op keeps the Conv's name and holds the range after the BN;
    * an Add of a per-channel constant after a Conv is the Conv's bias: the Conv's name;
    * an Add of a constant after a MatMul with a constant weight is a Gemm: ``<Add output>_Gemm``.

    A fusion that keeps the *last* node's name (Conv+Relu is ``<Relu output>_Relu``, SiLU is
    ``<Mul output>_Mul``) needs no rule: that node's own name is the op's.
    """
    constants = {t.name: t for t in graph.initializer}
    readers, producer = consumers(graph), producers(graph)
    outputs = {o.name for o in graph.output}
    names = {i.name: i.name for i in graph.input if i.name not in constants}

    def alone(t: str) -> bool:
        return len(readers.get(t, [])) == 1 and t not in outputs

    def channels(conv) -> int | None:
        w = constants.get(conv.input[1]) if len(conv.input) > 1 else None
        if w is None or len(w.dims) < 3:
            return None
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        return w.dims[0] if conv.op_type == "Conv" else w.dims[1] * group

    for node in graph.node:
        data = [i for i in node.input if i and i not in constants]
        src = producer.get(node.input[0]) if node.input and node.input[0] else None
        for k, out in enumerate(node.output):
            if not out:
                continue
            name = f"{out}_{node.op_type}"
            if node.op_type in ("Identity", "Dropout") and k == 0 and node.input[0] in names:
                name = names[node.input[0]]
            elif node.op_type == "BatchNormalization" and src is not None and src.op_type in _FOLDS_BN \
                    and alone(node.input[0]) and node.input[0] in names:
                name = names[node.input[0]]
            elif node.op_type == "Add" and len(node.input) == 2 and len(data) == 1 and alone(data[0]):
                prod, const = producer.get(data[0]), next(constants[i] for i in node.input if i in constants)
                if prod is not None and prod.op_type in ("Conv", "ConvTranspose") and data[0] in names and \
                        _bias_shaped(const.dims, channels(prod), len(constants[prod.input[1]].dims) - 2):
                    name = names[data[0]]
                elif prod is not None and prod.op_type == "MatMul" and prod.input[1] in constants:
                    name = f"{out}_Gemm"
            names[out] = name
    return names


def table_names(graph: GraphProto, source: GraphProto | None) -> dict[str, str]:
    """TPU-MLIR's name for each tensor of ``graph`` (a prepared model): from ``source`` (the
    user's graph, before edgequant's passes renamed anything) where the tensor is there, else
    from ``graph`` itself (a tensor the passes made, such as an inlined ``If`` branch's)."""
    own = op_names(graph)
    theirs = op_names(source) if source is not None else {}
    return {t: theirs.get(t, n) for t, n in own.items()}


def _index_names(index: GraphIndex) -> dict[str, str]:
    """``table_names`` of an index's graph, computed once per index (a table's rows share it)."""
    cached = getattr(index, "_tpu_names", None)
    if cached is None:
        cached = table_names(index.graph, index.source)
        index._tpu_names = cached  # type: ignore[attr-defined]
    return cached


def _number(v: float) -> str:
    """A number TPU-MLIR's reader takes: fixed point, or a lower-case ``e`` with a negative
    exponent for small values (``%.7f`` would write them as 0)."""
    return f"{v:.7f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.7e}"


def cali_rows(result) -> dict[str, tuple[float, float, float]]:
    """``{op name: (threshold, min, max)}`` for every quantized tensor of ``result``; where
    several tensors are one TPU-MLIR op (a Conv and its bias Add), the last in graph order,
    which is the op's output. A range of zero width gets TPU-MLIR's floor."""
    names = table_names(result.float_model.graph, result.source_graph)
    rows: dict[str, tuple[float, float, float]] = {}
    for tensor, a in result.plan.activations.items():
        lo, hi = result.ranges[a.root]
        th = max(abs(lo), abs(hi))
        if not th > THRESHOLD_FLOOR:
            th, lo, hi = THRESHOLD_FLOOR, (-THRESHOLD_FLOOR if lo < 0 else 0.0), THRESHOLD_FLOOR
        rows[names.get(tensor, tensor)] = (th, lo, hi)
    return rows


def dumps_cali_table(result) -> str:
    lines = ["# edgequant calibration table", f"# op names: {TPU_MLIR_NAMING}", "# op_name threshold min max"]
    lines += [f"{name} {_number(th)} {_number(lo)} {_number(hi)}" for name, (th, lo, hi) in cali_rows(result).items()]
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


def _sections(text: str):
    """The int8 block of a TPU-MLIR table: its own ``#int4_th``, ``#weight_scale``, fp8 and
    ``#asym_op`` sections (each opened by a ``#`` line naming it, closed by another comment) skipped."""
    markers = ("int4_th", "weight_scale", "tpu-mlir-fp8", "mqbench-fp8", "asym_op", "int4_op")
    keep = True
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            keep = not any(m in line for m in markers)
            yield ""
        elif not keep and line.split() and line.split()[0] == "int4_op":
            yield ""
        else:
            yield raw if keep else ""


@dataclass(frozen=True)
class TpuTensor:
    """A tensor named the way a TPU-MLIR table names it: its op name (``table_names``), or its
    plain tensor name (tables edgequant wrote before it used op names)."""

    name: str
    tensors = True

    def select(self, model: Graph) -> list:
        raise ConfigError(f"{self} selects a tensor, not nodes")

    def select_tensors(self, model: Graph, candidates: list[str]) -> list[str]:
        index = GraphIndex.of(model)
        if self.name in candidates:
            return [self.name]
        names = _index_names(index)
        wanted = [t for t, n in names.items() if n == self.name]
        if not wanted:  # a TPU-MLIR fusion named after its last node: <output>_<FusedType>
            stem = self.name.rpartition("_")[0]
            wanted = [stem] if stem in names else []
        if not wanted:
            raise TensorNameError(f"{self.name!r} names no op of the model as TPU-MLIR names them "
                                  f"(<output>_<OpType>); closest: {closest_names(self.name, sorted(set(names.values())))}")
        picked = [t for t in wanted if t in candidates]
        return picked[-1:]  # one op, several tensors (a Conv and its bias Add): the op's output; none: float here

    def __str__(self) -> str:
        return f"tensor {self.name}"


def loads_cali_table(text: str, origin: str = "cali-table") -> tuple[Override, ...]:
    """Pinned ranges from a calibration table edgequant or TPU-MLIR (``run_calibration.py``)
    wrote. A row for an op edgequant leaves float, or fuses away, is skipped."""
    out = []
    for k, parts in _rows("\n".join(_sections(text)), origin, (2, 4)):
        try:
            values = [float(v) for v in parts[1:]]
        except ValueError:
            raise ConfigError(f"{origin} line {k}: threshold/min/max must be numbers: {' '.join(parts)}") from None
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"{origin} line {k}: threshold/min/max must be finite with min ≤ max: {' '.join(parts)}")
        lo, hi = (values[1], values[2]) if len(values) == 3 else (-abs(values[0]), abs(values[0]))
        out.append(Override(TpuTensor(parts[0]), range=(lo, hi)))
    return tuple(out)


_MODES: dict[str, QuantDType | str] = {"F32": FLOAT, "F16": FLOAT, "BF16": FLOAT, "INT8": QuantDType.INT8}


def qtable_rows(result) -> tuple[dict[str, str], list[str]]:
    """(``{op name: mode}``, notes). Every layer edgequant runs in float is ``F32``: those the
    plan keeps float, and ops the QDQ model leaves float that TPU-MLIR would otherwise run in
    INT8 (and find no threshold for). A precision TPU-MLIR has no mode for is a note."""
    plan, graph = result.plan, result.float_model.graph
    names = table_names(graph, result.source_graph)
    inits = {t.name for t in graph.initializer}
    rows: dict[str, str] = {}
    others: list[str] = []
    for node in graph.node:
        outs = [o for o in node.output if o and o in names]
        if not outs or node.op_type in ("Identity", "Dropout", "Constant"):
            continue
        precision = plan.precision.get(node.name, "")
        if precision.split(",")[0] == "float":
            rows[names[outs[0]]] = "F32"
        elif precision and precision.split(",")[0] != "int8":
            others.append(f"{names[outs[0]]} ({precision})")
        elif not precision and _runs_float(node, plan, inits):
            rows[names[outs[0]]] = "F32"
    notes = []
    if others:
        notes.append(f"qtable: TPU-MLIR has no integer mode for {len(others)} layers kept in 16 bits "
                     f"({', '.join(others[:3])}{', …' if len(others) > 3 else ''}); the chip runs them in INT8 — "
                     "use float (F32/F16) for them instead")
    return rows, notes


def _runs_float(node, plan, inits: set[str]) -> bool:
    """A node the QDQ model computes in float: no quantized output, weight or fusion, and a
    float data input that arrives unquantized (ops on shapes and indices have none)."""
    if node.name in plan.weights or node.name in plan.fused or node.name in plan.folded_nodes:
        return False
    if any(o in plan.activations for o in node.output):
        return False
    data = [i for i in node.input if i and i not in inits]
    return node.name in plan.float_nodes and any(i not in plan.activations for i in data)


def dumps_qtable(result) -> str:
    rows, _ = qtable_rows(result)
    lines = ["# edgequant quantize table", f"# op names: {TPU_MLIR_NAMING}", "# op_name quantize_mode"]
    return "\n".join(lines + [f"{name} {mode}" for name, mode in rows.items()]) + "\n"


class _LayerByOutput(NamePattern):
    """A qtable name: the node writing that tensor (by its TPU-MLIR op name or its plain
    tensor name), or the node of that name."""

    def select(self, model):
        index = GraphIndex.of(model)
        names = _index_names(index)
        tensors = [t for t, n in names.items() if n == self.text] or ([self.text] if self.text in names else [])
        for node in index.nodes:
            if any(t in node.output for t in tensors) or node.name == self.text:
                return [node]
        raise TensorNameError(f"qtable layer {self.text!r} is not in the model; closest: "
                              f"{closest_names(self.text, sorted(set(names.values())))}")


def loads_qtable(text: str, origin: str = "qtable") -> tuple[Override, ...]:
    out = []
    for k, parts in _rows(text, origin, (2,)):
        mode = parts[1].upper()
        if mode not in _MODES:
            hint = " (INT4 weights are not supported yet)" if mode == "INT4" else ""
            raise ConfigError(f"{origin} line {k}: mode {parts[1]!r} is not F32, F16, BF16 or INT8{hint}")
        out.append(Override(_LayerByOutput(parts[0]), _MODES[mode]))
    return tuple(out)
