"""Hypergradient methods, all with the contract ``method(problem, raw=None) -> HyperGradient``."""

from .base import HyperGradient, Method
from .checkpointed import checkpointed
from .finite_difference import CostWarning, finite_difference
from .forward import forward
from .implicit import implicit
from .reverse import reverse
from .reversible import reversible
from .truncated import truncated

__all__ = [
    "CostWarning",
    "HyperGradient",
    "Method",
    "checkpointed",
    "finite_difference",
    "forward",
    "implicit",
    "reverse",
    "reversible",
    "truncated",
]
