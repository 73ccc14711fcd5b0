"""The preparation pipeline: passes run in a fixed order, each reported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from onnx import ModelProto

from edgequant.passes.batchnorm import FoldBatchNorm
from edgequant.passes.constants import (
    ConstantsToInitializers,
    FoldConstants,
    drop_unused_initializers,
)
from edgequant.passes.identity import RemoveIdentity
from edgequant.passes.irversion import RaiseIRVersion
from edgequant.passes.shapes import InferShapes


class GraphPass(Protocol):
    name: str

    def __call__(self, model: ModelProto) -> bool: ...


@dataclass(frozen=True)
class PassResult:
    name: str
    changed: bool


def prepare_model(model: ModelProto, simplify: bool = True) -> list[PassResult]:
    """Run the preparation passes in place; ``simplify=False`` skips folding and BN fusion.

    Order: IR version (pre-IR-4 models), constants → initializers, identity removal, shape
    inference, then constant and BN folding. Folding only removes nodes or hands an output
    name to another node, so the types inferred before it stay true for every tensor that
    remains.
    """
    passes: list[GraphPass] = [RaiseIRVersion(), ConstantsToInitializers(), RemoveIdentity(), InferShapes()]
    if simplify:
        passes += [FoldConstants(), FoldBatchNorm()]
    results = [PassResult(p.name, bool(p(model))) for p in passes]
    drop_unused_initializers(model)
    return results
