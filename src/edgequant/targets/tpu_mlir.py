"""Sophgo TPU-MLIR: symmetric int8 with per-tensor thresholds (calibration table), per-channel
weights; the asymmetric variant matches ``model_deploy.py --asymmetric``.

What the QDQ model mirrors of TPU-MLIR 1.30's INT8 lowering (bm1684x):
* every op is quantized, the graph outputs included (the chip hands back int8, cast to float);
* Conv/Gemm + Relu/Relu6, a zero Pad before a Conv, a constant (bias) Add after a Conv or
  MatMul, and ``x · Sigmoid(x)`` (SiLU) each run as one op, quantized once;
* a symmetric tensor whose calibrated min is ≥ 0 is unsigned (uint8, zero point 0): the
  calibration table's threshold over 255 steps, not 127;
* a Concat's input read by it alone takes the Concat's range (TPU-MLIR copies it back);
* Sigmoid and Softmax outputs are quantized over [0, 1], whatever calibration saw;
* weights are rounded from their float values over max |w| (model_deploy rounds them itself:
  the calibration table holds activations only); per channel for convolutions, per tensor for
  MatMul/Gemm (``model_deploy.py`` without ``--matmul_perchannel``);
* no 16-bit integer layers: a layer that needs more runs in float (qtable ``F32``).
"""

from edgequant.quant.dtypes import QuantDType
from edgequant.targets.profile import TargetProfile

_TPU = dict(fallback=("float",), fusions=("relu", "pad", "bias", "silu"), quantize_all_ops=True, quantize_outputs=True,
            unit_range_ops=("Sigmoid", "Softmax"), weight_clipping=1.0, tied_inputs=("Concat",), per_channel_ops=("Conv", "ConvTranspose"))
PROFILES = [
    TargetProfile("tpu-mlir", "Sophgo TPU-MLIR", "int8 symmetric activations (thresholds), int8 weights: per channel (Conv), per tensor (MatMul)",
                  QuantDType.INT8, True, QuantDType.INT8, True, True, unsigned_nonnegative=True, **_TPU),  # type: ignore[arg-type]
    TargetProfile("tpu-mlir-asym", "Sophgo TPU-MLIR", "int8 asymmetric activations (--asymmetric), int8 weights as tpu-mlir",
                  QuantDType.INT8, False, QuantDType.INT8, True, True, **_TPU),  # type: ignore[arg-type]
]
