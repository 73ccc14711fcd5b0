"""Graph preparation passes. Each does one rewrite and returns whether it changed the model."""

from edgequant.passes.batchnorm import FoldBatchNorm
from edgequant.passes.constants import ConstantsToInitializers, FoldConstants
from edgequant.passes.identity import RemoveIdentity
from edgequant.passes.irversion import RaiseIRVersion
from edgequant.passes.pipeline import PassResult, prepare_model
from edgequant.passes.shapes import InferShapes

__all__ = [
    "ConstantsToInitializers",
    "FoldBatchNorm",
    "FoldConstants",
    "InferShapes",
    "PassResult",
    "RaiseIRVersion",
    "RemoveIdentity",
    "prepare_model",
]
