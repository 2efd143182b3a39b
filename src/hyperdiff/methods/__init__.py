"""Hypergradient methods: ``method(problem, raw=None) -> HyperGradient`` and, where their
capabilities say online, ``method.segment(...) -> Segment`` (:mod:`hyperdiff.methods.base`)."""

from hyperdiff.methods.base import Capabilities, HyperGradient, Method, Segment
from hyperdiff.methods.checkpointed import checkpointed
from hyperdiff.methods.curvature import curvature
from hyperdiff.methods.finite_difference import CostWarning, finite_difference
from hyperdiff.methods.fomaml import fomaml
from hyperdiff.methods.forward import forward
from hyperdiff.methods.implicit import implicit
from hyperdiff.methods.reptile import reptile
from hyperdiff.methods.reverse import reverse
from hyperdiff.methods.reversible import reversible
from hyperdiff.methods.truncated import truncated

__all__ = [
    "Capabilities",
    "CostWarning",
    "HyperGradient",
    "Method",
    "Segment",
    "checkpointed",
    "curvature",
    "finite_difference",
    "fomaml",
    "forward",
    "implicit",
    "reptile",
    "reverse",
    "reversible",
    "truncated",
]
