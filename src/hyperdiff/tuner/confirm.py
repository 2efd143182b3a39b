"""A new best confirmed on other minibatch seeds before it is ranked (``outer.confirm``).

One training per outer step ranks the steps by a random selection loss, and on an unstable
learning rate the luckiest of 30 draws wins (the winner's curse: ``shapes_cnn`` from 10x too
small picks a step whose selection loss 0.44 retrains to a test loss of 0.96). With
``confirm = c > 0`` a step whose selection loss ``S_0`` (the mean over its slots) beats the best
so far is trained ``c`` more times from ``theta_0`` at the same values, each problem (fold) with
the minibatch seed :func:`~hyperdiff.seeds.confirm_seed` ``(seed, step, k)``, ``k < c``, and
ranked by

    S = (S_0 + sum_k S_k) / (1 + c),   S_k = mean over the problems of L_sel(theta_T^(k))

(also the record's ``selection_loss``). A step that does not beat the best costs nothing more.
The confirmations give no hypergradient: they only decide whether the step is the best.
Measured with one confirmation on the suite's tasks from starts 0.01x-100x off (docs/driver.md,
session 30): not better on average, worse on ``shapes_cnn``'s own start, +37% trainings; off by
default.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.seeds import confirm_seed
from hyperdiff.tuner.sampler import train_plainly
from hyperdiff.typing import Batch


def confirmation_loss(problem: Problem, selection: list[Batch], raw: dict[str, Tensor],
                      seed: int) -> float:
    """``L_sel(theta_T)`` after a plain training of ``problem`` with minibatch seed ``seed``
    at the raw values ``raw``.

    Raises:
        NonFiniteError: the training diverged or the loss is not finite.
    """
    probe = replace(problem, seed=seed, val_data=selection)
    return train_plainly(probe, raw, where="confirm", split="selection").value


def confirmed(first: float, problems: list[Problem], selection: list[Batch],
              raw: dict[str, Tensor], *, seed: int, step: int, count: int) -> float:
    """``S = (S_0 + sum_k S_k) / (1 + count)`` (module doc), ``first`` being ``S_0``."""
    extra = [sum(confirmation_loss(p, selection, raw, confirm_seed(seed, step, k))
                 for p in problems) / len(problems) for k in range(count)]
    return (first + sum(extra)) / (1 + count)


__all__ = ["confirmation_loss", "confirmed"]
