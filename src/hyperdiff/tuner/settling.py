"""When an online run stops paying for tuning: settled values and the plain rest of the run.

A window of an online run costs more than its training steps: the method's carried tangents
(every step), the validation batch and the last step's backward pass, the outer step and its
record (docs/online.md, "Cost and quality"). Once tuning no longer changes the values, that is
paid for nothing. With a :class:`Settling` rule the plan decides, after each tuned window that
ends at inner step ``t`` (before the run's end, and not before the hot-start measure at
:data:`~hyperdiff.tuner.hot_start.FRACTION` of the run), whether the values have settled:

    after:  t >= after * N                                      (a fraction of the run)
    tol:    max_i |lam_i - lam_i'| / |lam_i'| < tol             (the relative change)

with ``lam`` the values after the window's outer step (the ones the rest of the run trains
with) and ``lam'`` those of :data:`WINDOWS` windows before (the values window ``h + 1 -
WINDOWS`` trained with), over every entry of every hyperparameter. From then on every window
``[t, t')`` is trained plainly at those values (:func:`plain_window`): the steps of
:func:`~hyperdiff.engine.training.unroll`, no tangents, no validation, no outer step. The
windows keep their boundaries (a record and a checkpoint each, at a fraction of a tuned
window's cost), the method's carry is dropped (the tangents describe values that are no longer
tuned), and the run's result is the values it settled at and the model trained with them.

The plain windows are exactly a plain training at the settled values from the settling
window's state: the same steps, data and arithmetic as ``unroll(..., differentiable=False)``
(``tests/test_online_settle.py`` checks this bit for bit against a hand-written loop).

>>> rule = Settling(after=0.5)
>>> rule.reason(stop=40, steps=100, current={"lr": 0.1}, earlier=[]) is None
True
>>> rule.reason(stop=50, steps=100, current={"lr": 0.1}, earlier=[])
'the run reached 50% of its steps (outer.settle = 0.5)'
>>> largest_change({"lr": 0.1, "w": [1.0, 2.0]}, {"lr": 0.1, "w": [1.0, 2.5]})
0.25
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import TrainState, check_finite_losses, unroll
from hyperdiff.errors import Range, fail, number
from hyperdiff.tuner.budget import relative_change

AFTER = Range(0.0, 1.0, open_low=True)  # a fraction of the run in (0, 1]
TOL = Range(0.0)  # a relative change >= 0 (0: never by the change)
WINDOWS = 2
"""The values are compared with those of this many windows before (two outer steps)."""


@dataclass(frozen=True)
class Settling:
    """When an online run stops tuning (module doc).

    Attributes:
        after: settle once the run has trained this fraction of its steps (1: never by it).
        tol: settle once the largest relative change of a value over the last
            :data:`WINDOWS` windows is below this (0: never by it).
    """

    after: float = 1.0
    tol: float = 0.0

    @classmethod
    def checked(cls, caller: str, after: float, tol: float) -> Settling:
        """The rule, refused with the standard message when a number is out of range."""
        return cls(number(caller, "settle", after, AFTER), number(caller, "settle_tol", tol, TOL))

    @property
    def never(self) -> bool:
        return self.after >= 1.0 and self.tol <= 0.0

    def reason(self, stop: int, steps: int, current: dict[str, Any],
               earlier: Sequence[dict[str, Any]]) -> str | None:
        """Why the run settles after the window that ends at inner step ``stop`` of ``steps``,
        or None; ``current``: the values after its outer step, ``earlier``: the natural values
        of the windows trained so far, oldest first (this one last)."""
        if self.after < 1.0 and stop >= self.after * steps:
            return (f"the run reached {100 * stop / steps:.3g}% of its steps "
                    f"(outer.settle = {self.after:g})")
        if self.tol > 0.0 and len(earlier) >= WINDOWS:
            change = largest_change(earlier[-WINDOWS], current)
            if change < self.tol:
                return (f"the values changed by at most {change:.3g} (relative) over the last "
                        f"{WINDOWS} windows (outer.settle_tol = {self.tol:g})")
        return None


def largest_change(before: dict[str, Any], after: dict[str, Any]) -> float:
    """``max_i |after_i - before_i| / |before_i|`` over every entry of every value (natural
    values as records hold them: a float per scalar, a list per vector;
    :func:`~hyperdiff.tuner.budget.relative_change` of each: an entry that was 0 is measured
    against the vector's largest ``|before|``); ``inf`` where a whole value before is 0 and
    changed."""
    return max((relative_change(old, after[name]) for name, old in before.items()), default=0.0)


def plain_window(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                 stop: int) -> tuple[TrainState, Tensor]:
    """Steps ``[start, stop)`` from ``state`` at the values ``raw``, without a graph: the new
    state and the train losses ``(stop - start,)``.

    Raises:
        NonFiniteError: naming the step whose train loss is not finite.
    """
    if not 0 <= start < stop <= problem.steps:
        raise fail("plain_window", "start, stop", f"0 <= start < stop <= {problem.steps}",
                   (start, stop))
    hview = problem.hparams.view(raw)
    with torch.no_grad():
        state, losses = unroll(problem, hview, state, start=start, stop=stop,
                               differentiable=False)
    check_finite_losses(losses, "plain window (settled values)", start)
    return state, losses


__all__ = ["WINDOWS", "Settling", "largest_change", "plain_window"]
