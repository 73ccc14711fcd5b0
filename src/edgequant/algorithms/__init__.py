"""Accuracy recovery that keeps layers in 8 (or 4) bits: equalization, bias correction, learned
and Hessian-based rounding, SmoothQuant. Each module has a pure core and is fed from the
calibrated state by ``algorithms.stage``."""
