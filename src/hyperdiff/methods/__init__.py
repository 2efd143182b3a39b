"""Hypergradient methods, all with the contract ``method(problem, raw=None) -> HyperGradient``."""

from .base import HyperGradient, Method
from .finite_difference import CostWarning, finite_difference
from .forward import forward
from .reverse import reverse

__all__ = ["CostWarning", "HyperGradient", "Method", "finite_difference", "forward", "reverse"]
