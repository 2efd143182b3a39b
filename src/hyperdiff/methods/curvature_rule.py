"""What every optimizer's tangent rule of the ``curvature`` window shares: the rule's shape
(:class:`CurvatureRule`) and the squared-gradient decay :data:`RHO`.

:mod:`hyperdiff.methods.curvature` (heavy-ball SGD, the window) and
:mod:`hyperdiff.methods.curvature_adam` (Adam / AdamW) both build on this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor

from hyperdiff.engine.problem import Problem

RHO = 0.99  # decay of the squared-gradient average (Adam's beta2 for this estimate)


class CurvatureRule(NamedTuple):
    """One optimizer's tangent rule for :func:`~hyperdiff.methods.curvature.curvature_segment`:

    - ``initial(problem, raw)``: the zero tangent it carries;
    - ``values(problem, hview, grads, params, old_state, new_state, step)``: what the rule
      reads from step ``step`` (its gradient, moments, coefficients);
    - ``advance(tangent, values, lr, dlr, mu, scale, count)``: one step of the recurrence, in
      place (``dlr`` None: without the direct term; ``count`` the squared gradients averaged
      after it, a Python int: the bias correction reads no device value);
    - ``direct(values, lr)``: ``-d theta_{t+1} / d lr_t`` (n,), the direct term's vector."""

    initial: Callable[[Problem, dict[str, Tensor]], Any]
    values: Callable[..., Any]
    advance: Callable[..., None]
    direct: Callable[[Any, Tensor], Tensor]


def keeps_all(mu: float | Tensor) -> bool:
    """Whether the forgetting factor ``mu`` keeps the whole past (exactly 1.0)."""
    return isinstance(mu, float) and mu == 1.0


__all__ = ["RHO", "CurvatureRule", "keeps_all"]
