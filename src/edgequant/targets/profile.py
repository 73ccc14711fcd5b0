"""The TargetProfile value and the validator that checks a QDQ model obeys it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, numpy_helper

from edgequant.quant.dtypes import QuantDType
from edgequant.quant.params import DEFAULT_SCHEME, Scheme


@dataclass(frozen=True)
class TargetProfile:
    """What a chip family computes: types, symmetry, granularity and number scheme.

    ``fallback`` lists what a layer may fall back to when int8 is not enough
    (``int16``, ``float``), so mixed precision only proposes what the chip can run;
    ``fallback_weight`` is the weight dtype of a 16-bit layer (int16, or int8 where the chip
    runs 16-bit activations with 8-bit weights only, as NeuroPilot's 8w16a).
    """

    name: str
    vendor: str
    description: str
    activation: QuantDType
    activation_symmetric: bool
    weight: QuantDType
    weight_symmetric: bool
    per_channel: bool
    scheme: Scheme = DEFAULT_SCHEME
    fallback: tuple[str, ...] = ("int16", "float")
    notes: tuple[str, ...] = ()
    per_channel_ops: tuple[str, ...] | None = None  # per-channel weights only for these op types
    fallback_weight: QuantDType = QuantDType.INT16
    constants: bool = False  # constant operands of Add/Mul quantized (onnxruntime's QLinearAdd/QLinearMul)
    repair_fallback: str | None = None  # what the default repair moves layers to (None: int16, else float)
    control_flow: bool = False  # runs If/Loop/Scan (onnxruntime does; an NPU sends them to its CPU, if anywhere)
    # what the compiler runs as one op, quantized once (planning.plan.FUSIONS); NPU compilers
    # fuse Conv+Relu/Relu6 and a zero Pad into the Conv (onnxruntime on a host: only what
    # asymmetric Relu folding gives)
    fusions: tuple[str, ...] = ("relu", "pad")
    quantize_all_ops: bool = False  # every op quantized, not only planning.ops's (TPU-MLIR)
    unsigned_nonnegative: bool = False  # symmetric tensors with min ≥ 0 unsigned (TPU-MLIR)
    quantize_outputs: bool = False  # the graph outputs quantized (the chip hands back int8)
    unit_range_ops: tuple[str, ...] = ()  # outputs quantized over [0, 1] whatever calibration saw
    tied_inputs: tuple[str, ...] = ()  # inputs read by these ops alone take the output's parameters
    float_output_ops: tuple[str, ...] = ()  # outputs the chip hands over in float
    # a fixed share of each weight channel's range (1.0: max |w|, as a toolchain that rounds the
    # float weights itself does); None: edgequant's MSE search
    weight_clipping: float | None = None
    # Convs (group 1) reading fewer input channels than this stay float: onnxruntime's float
    # kernel runs them faster than QLinearConv (planning.plan.narrow_convs); 0: none
    float_narrow_convs: int = 0

    def rules(self) -> list[tuple[str, str]]:
        s = self.scheme
        sym = {True: "symmetric", False: "asymmetric"}
        return [
            ("activations", f"{self.activation.value}, {sym[self.activation_symmetric]}, per tensor"),
            ("weights", f"{self.weight.value}, {sym[self.weight_symmetric]}, "
                        f"{'per channel' if self.per_channel else 'per tensor'}"
                        f"{' (' + ', '.join(self.per_channel_ops) + ' only)' if self.per_channel and self.per_channel_ops else ''}"
                        f"{', narrow range' if s.narrow_range else ''}"),
            ("scales", "powers of two (2^exponent)" if s.power_of_two else "any positive float"),
            ("rounding", {"half_even": "half to even", "half_up": "half up"}[s.rounding]),
            ("bias", f"int32 holding at most {s.bias_bits} bits, scale = s_in · s_w"),
            ("fallback", ", ".join(f"{f} (weights {self.fallback_weight.value})" if f == "int16" else f
                                   for f in self.fallback) or "none"),
            ("fused", ", ".join(_FUSED[f] for f in self.fusions) or "none: each op's output quantized"),
            *([("unsigned", "a symmetric tensor that is never negative: unsigned, zero point 0")]
              if self.unsigned_nonnegative else []),
            *([("ops", "every op quantized, the outputs included")] if self.quantize_all_ops else []),
            *([("weight range", "max |w| (the toolchain rounds the float weights itself)" if self.weight_clipping == 1.0
                else f"{self.weight_clipping:g} of max |w|")] if self.weight_clipping is not None else []),
            *([("tied", f"{', '.join(self.tied_inputs)}: an input read by it alone takes the output's scale")]
              if self.tied_inputs else []),
            *([("float outputs", ", ".join(self.float_output_ops))] if self.float_output_ops else []),
            *([("float Convs", f"group-1 Convs reading fewer than {self.float_narrow_convs} channels (an image "
                               "stem): onnxruntime's float kernel runs them faster")] if self.float_narrow_convs else []),
            *([("fixed ranges", f"{', '.join(self.unit_range_ops)} outputs over [0, 1]")] if self.unit_range_ops else []),
            ("control flow", "If/Loop/Scan run" if self.control_flow else
             "none: fix the shapes (--input-shape, --fix-input) so the Ifs fold away"),
        ] + ([("repair", f"moves layers to {self.repair_fallback}")] if self.repair_fallback else []) \
            + [("note", n) for n in self.notes]


_FUSED = {"relu": "Conv/Gemm + Relu/Relu6", "pad": "zero Pad into Conv", "bias": "Conv/MatMul + constant Add",
          "silu": "x · Sigmoid(x)"}


@dataclass(frozen=True)
class Violation:
    tensor: str
    rule: str

    def __str__(self) -> str:
        return f"{self.tensor}: {self.rule}"


def _dq_params(model: ModelProto):
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
        data = inits.get(node.input[0])
        yield node, scale, zp, data


def check_model(model: ModelProto, profile: TargetProfile) -> list[Violation]:
    """Every rule of ``profile`` the QDQ ``model`` breaks (empty when it obeys)."""
    out: list[Violation] = []
    s = profile.scheme
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    if not profile.control_flow:
        for n in model.graph.node:
            if n.op_type in ("If", "Loop", "Scan"):
                out.append(Violation(n.name or n.op_type, f"{n.op_type}: the target runs no control flow; quantize with "
                                     "the input shapes fixed (--input-shape, --fix-input) so it folds away"))
    for node, scale, zp, data in _dq_params(model):
        name = node.output[0]
        is_bias = data is not None and data.data_type == 6  # int32 data
        # a constant operand of Add/Mul is quantized as an activation (plan_constants)
        constant = data is not None and bool(readers.get(name)) and readers[name] <= {"Add", "Mul"}
        is_weight = data is not None and not is_bias and not constant
        if s.power_of_two:
            exps = np.log2(scale.astype(np.float64))
            if not np.allclose(exps, np.round(exps), atol=1e-6):
                out.append(Violation(name, f"scale {float(scale.ravel()[0]):.6g} is not a power of two"))
        if is_bias:
            continue
        want_sym = profile.weight_symmetric if is_weight else profile.activation_symmetric
        dtype = profile.weight if is_weight else profile.activation
        if zp is not None and want_sym and dtype.signed and np.any(zp != 0):
            out.append(Violation(name, "symmetric quantization needs zero point 0"))
        if is_weight:
            per_channel = scale.size > 1
            consumer_ops = {c.op_type for c in model.graph.node if name in c.input}
            wants = profile.per_channel and (profile.per_channel_ops is None or bool(consumer_ops & set(profile.per_channel_ops)))
            if wants != per_channel and data.dims and data.dims[0] > 1:
                out.append(Violation(name, f"weights must be {'per channel' if wants else 'per tensor'}"))
            if s.narrow_range and dtype.signed:
                q = numpy_helper.to_array(data)
                if np.any(q == dtype.qmin):
                    out.append(Violation(name, f"narrow range: weight value {dtype.qmin} is not allowed"))
        if zp is not None:
            allowed = {profile.weight.np_dtype} if is_weight else {profile.activation.np_dtype}
            if profile.unsigned_nonnegative and not is_weight:
                allowed.add(profile.activation.unsigned.np_dtype)
            if "int16" in profile.fallback:
                allowed |= {np.int16, np.uint16}
            if zp.dtype.type not in allowed:
                out.append(Violation(name, f"type {zp.dtype} is not one the target runs"))
    return out
