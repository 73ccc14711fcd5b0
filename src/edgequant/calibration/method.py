"""How an activation's clipping range is chosen from calibration data."""

from __future__ import annotations

import enum

from edgequant.errors import ConfigError


class Method(enum.Enum):
    """How an activation's clipping range is chosen from calibration data."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"
    #: per tensor, whichever of minmax / percentile / entropy / mse quantizes its histogram
    #: with the least expected squared error (TPU-MLIR's ``search_threshold``)
    SEARCH = "search"

    @classmethod
    def parse(cls, text: str) -> Method:
        aliases = {"kl": "entropy", "default": "percentile", "max": "minmax"}
        key = aliases.get(text.lower(), text.lower())
        try:
            return cls(key)
        except ValueError:
            valid = ", ".join([m.value for m in cls] + list(aliases))
            raise ConfigError(
                f"calibration type {text!r} is not implemented; valid: {valid}"
            ) from None
