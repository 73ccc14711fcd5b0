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
