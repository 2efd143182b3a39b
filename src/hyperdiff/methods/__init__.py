"""Hypergradient methods, all with the contract ``method(problem, raw=None) -> HyperGradient``."""

from hyperdiff.methods.base import HyperGradient, Method
from hyperdiff.methods.checkpointed import checkpointed
from hyperdiff.methods.finite_difference import CostWarning, finite_difference
from hyperdiff.methods.forward import forward
from hyperdiff.methods.implicit import implicit
from hyperdiff.methods.reverse import reverse
from hyperdiff.methods.reversible import reversible
from hyperdiff.methods.truncated import truncated

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
