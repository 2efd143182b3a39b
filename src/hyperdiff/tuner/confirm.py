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

``confirm_chaotic = c`` (on by default, ``c = 2``) confirms only a would-be best whose
hypergradient is chaotic (:func:`chaotic`): its norm above ``CHAOS_RATIO x max(|L_val|, 1)``,
a training near the edge of stability, whose one selection loss is a lucky or unlucky draw from
a wide spread over minibatch orders. Such a step is confirmed ``max(confirm, c)`` times. The
rule is skipped (:func:`chaotic_skipped`) where a confirmation could not repeat the step's
training (warm starts, discrete choices, a data-parallel method, whose trainings shard every
batch over the ranks) and where it would most likely repeat its loss: problems that all train
on one fixed batch, where only randomness the loss draws itself (dropout) differs between
seeds (``confirm`` confirms every new best there). Measured on the suite's default runs with a
chaotic best (docs/driver.md, "Chaotic steps"): test loss x0.27-x1.006, 2-8 more plain
trainings a run.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.seeds import confirm_seed
from hyperdiff.tuner.sampler import train_plainly
from hyperdiff.tuner.stopping import CHAOS_RATIO, calm
from hyperdiff.typing import Batch


def chaotic(grad_norm: float | None, val_loss: float) -> bool:
    """Whether a step's hypergradient norm is above ``CHAOS_RATIO x max(|val_loss|, 1)``
    (a step without a hypergradient is not).

    >>> chaotic(150.0, 0.64), chaotic(30.0, 0.64), chaotic(None, 0.64)
    (True, False, False)
    """
    return not calm(grad_norm, val_loss, CHAOS_RATIO)


def chaotic_skipped(problems: list[Problem], *, warm_start: bool, discrete: bool,
                    data_parallel: bool) -> str:
    """Why ``confirm_chaotic`` does not apply to a run (module doc; ``""``: it does)."""
    if warm_start:
        return "warm starts"
    if discrete:
        return "discrete hyperparameters"
    if data_parallel:
        return "a data-parallel method"
    if all(getattr(p.train_data, "fixed_batch", False) for p in problems):
        return "a fixed training batch"
    return ""


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


__all__ = ["chaotic", "chaotic_skipped", "confirmation_loss", "confirmed"]
