"""Deciding what to quantize: the op-facts table, options and the QuantPlan."""

from edgequant.planning.options import Method, QuantOptions
from edgequant.planning.plan import ActivationPlan, BiasPlan, QuantPlan, WeightPlan, build_plan

__all__ = ["ActivationPlan", "BiasPlan", "Method", "QuantOptions", "QuantPlan", "WeightPlan", "build_plan"]
