"""Deciding what to quantize: the op-facts table, options and the QuantPlan."""

from edgequant.calibration.method import Method
from edgequant.planning.options import QuantOptions
from edgequant.planning.plan import ActivationPlan, BiasPlan, QuantPlan, WeightPlan, build_plan

__all__ = ["ActivationPlan", "BiasPlan", "Method", "QuantOptions", "QuantPlan", "WeightPlan", "build_plan"]
