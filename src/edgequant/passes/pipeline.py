"""The preparation pipeline: passes run in a fixed order, each reported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from onnx import ModelProto

from edgequant.passes.batchnorm import FoldBatchNorm
from edgequant.passes.constants import (
    ConstantsToInitializers,
    FoldConstants,
    _drop_unused_initializers,
)
from edgequant.passes.identity import RemoveIdentity
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

    Order: constants → initializers, identity removal, constant folding, BN folding, then
    shape inference so that later stages see every tensor's type and shape.
    """
    passes: list[GraphPass] = [ConstantsToInitializers(), RemoveIdentity()]
    if simplify:
        passes += [InferShapes(), FoldConstants(), FoldBatchNorm()]
    passes.append(InferShapes())
    results = [PassResult(p.name, bool(p(model))) for p in passes]
    _drop_unused_initializers(model)
    return results
