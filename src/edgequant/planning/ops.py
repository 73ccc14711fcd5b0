"""Op facts: one table saying how each ONNX op takes part in quantization.

kinds:
* ``weighted`` – has a weight (and maybe bias) initializer; activations in ``act_inputs``.
  Recurrent ops (LSTM/GRU/RNN) have two weights (input W, recurrent R); their bias stays
  float (it is added inside the cell), their initial states are activations.
* ``compute``  – its float inputs in ``act_inputs`` and its output get their own parameters.
* ``shared``   – output is a view/subset of input 0 (reshape, pooling max...): shares its params.
* ``relu``     – Relu/Clip: folded into the producer's output quantization when exact.
Any op not in the table stays float.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpFacts:
    kind: str
    act_inputs: tuple[int, ...] = (0,)
    weight_input: int | None = None
    bias_input: int | None = None
    extra_weights: tuple[int, ...] = ()


ALL = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)

OP_FACTS: dict[str, OpFacts] = {
    "Conv": OpFacts("weighted", (0,), 1, 2),
    "ConvTranspose": OpFacts("weighted", (0,), 1, 2),
    "Gemm": OpFacts("weighted", (0,), 1, 2),
    "MatMul": OpFacts("weighted", (0, 1), 1, None),
    "LSTM": OpFacts("weighted", (0, 5, 6), 1, None, (2,)),
    "GRU": OpFacts("weighted", (0, 5), 1, None, (2,)),
    "RNN": OpFacts("weighted", (0, 5), 1, None, (2,)),
    "Add": OpFacts("compute", (0, 1)),
    "Mul": OpFacts("compute", (0, 1)),
    "Concat": OpFacts("compute", ALL),
    "AveragePool": OpFacts("compute"),
    "GlobalAveragePool": OpFacts("compute"),
    "ReduceMean": OpFacts("compute"),
    "Sigmoid": OpFacts("compute"),
    "HardSigmoid": OpFacts("compute"),
    "HardSwish": OpFacts("compute"),
    "Tanh": OpFacts("compute"),
    "Softmax": OpFacts("compute"),
    "LeakyRelu": OpFacts("compute"),
    "PRelu": OpFacts("compute"),
    "Gelu": OpFacts("compute"),
    "LayerNormalization": OpFacts("compute"),
    "InstanceNormalization": OpFacts("compute"),
    "Relu": OpFacts("relu"),
    "Clip": OpFacts("relu"),
    "MaxPool": OpFacts("shared"),
    "GlobalMaxPool": OpFacts("shared"),
    "Reshape": OpFacts("shared"),
    "Transpose": OpFacts("shared"),
    "Flatten": OpFacts("shared"),
    "Squeeze": OpFacts("shared"),
    "Unsqueeze": OpFacts("shared"),
    "Slice": OpFacts("shared"),
    "Gather": OpFacts("shared"),
    "Split": OpFacts("shared"),
    "Resize": OpFacts("shared"),
    "Expand": OpFacts("shared"),
    "Tile": OpFacts("shared"),
    "DepthToSpace": OpFacts("shared"),
    "SpaceToDepth": OpFacts("shared"),
    "Pad": OpFacts("shared"),
}

#: Ops whose output quantization gives onnxruntime an integer kernel (used for the summary).
QUANTIZED_OUTPUT_KINDS = {"weighted", "compute", "relu"}


def facts_for(op_type: str, domain: str) -> OpFacts | None:
    if domain not in ("", "ai.onnx"):
        return None
    return OP_FACTS.get(op_type)


def weight_axis(op_type: str, ndim: int, attrs: dict) -> int | None:
    """Output-channel axis of a weight for per-channel quantization (None: per-tensor only)."""
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1 if attrs.get("group", 1) == 1 else None
    if op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    if op_type == "MatMul":
        return ndim - 1 if ndim >= 2 else None
    if op_type in ("LSTM", "GRU", "RNN"):  # W/R: [directions, gates × hidden, inputs]
        return 1 if ndim == 3 else None
    return None
