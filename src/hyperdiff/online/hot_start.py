"""Did an online run start hotter than the values it found? A warning, from its history.

Online tuning moves the learning rate reliably *up* from a too small start: a slow beginning
is made up later. From a too large start it is not reliable: the first steps train the model
fast at the large rate, and the signals after them describe that model, which a fresh training
with the tuned values never becomes (``benchmarks/horizon_starts.py``: docs/online.md). The
measure, at the first window that ends at or after ``fraction * N`` steps (step ``M``)::

    ratio = sum_{t < M} lr_t(lam_w(t)) / sum_{t < M} lr_t(lam_M)

the optimization time the run trained in its first M steps (each window ``w`` at the values
``lam_w`` it used) over the one that the values tuned by step M (those after the update that
follows the window ending at M), ``lam_M``, give those steps. Above ``limit`` the run trained its
beginning hotter than its own tuned values would, and the result deserves a rerun from a
smaller initial learning rate. The learning rate is the optimizer's ``lr`` coefficient: a
schedule (:mod:`hyperdiff.schedules`) or the name of a scalar hyperparameter; for other kinds
(a number, per-tensor or per-step values, a callable) the measure is not taken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..history import StepRecord
from ..problem import Problem
from ..schedules import Schedule

FRACTION = 0.1
LIMIT = 2.5


def optimization_time(problem: Problem, values: Mapping[str, Any], start: int, stop: int
                      ) -> float | None:
    """``sum_{start <= t < stop} lr_t`` at natural ``values`` (a record's ``hparams``), or
    None where the learning rate is not a schedule or a scalar hyperparameter."""
    coef = problem.optimizer.coefficients.get("lr")
    if isinstance(coef, Schedule):
        natural = {n: torch.tensor(float(values[n]), dtype=torch.float64)
                   for n in coef.names.values()}
        return float(coef.window(natural, start, stop).sum())
    if isinstance(coef, str) and isinstance(values.get(coef), float):
        return float(values[coef]) * (stop - start)
    return None


def hot_start_ratio(problem: Problem, records: Sequence[StepRecord], window: int,
                    current: Mapping[str, Any] | None = None, fraction: float = FRACTION
                    ) -> tuple[int, float] | None:
    """``(M, ratio)`` of the module doc from the run's records (``current``: the natural
    values now, used when no record follows the window that reaches M), or None before the
    run has trained ``fraction * N`` steps or where the measure is not taken."""
    target = math.ceil(fraction * problem.steps)
    realized, stop = 0.0, 0
    for record in records:
        if record.status != "ok":
            continue  # a failed window was discarded and trained again
        start, stop = stop, min(stop + window, problem.steps)
        used = optimization_time(problem, record.hparams, start, stop)
        if used is None:
            return None
        realized += used
        if stop >= target:
            after = _values_after(records, record, current)
            now = None if after is None else optimization_time(problem, after, 0, stop)
            return (stop, realized / now) if now else None
    return None


def _values_after(records: Sequence[StepRecord], record: StepRecord,
                  current: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The values the run went on with after ``record``'s window: the next ok record's, else
    ``current``."""
    later = [r for r in records if r.step > record.step and r.status == "ok"]
    return later[0].hparams if later else current


def hot_start_warning(problem: Problem, records: Sequence[StepRecord], window: int,
                      current: Mapping[str, Any] | None = None, fraction: float = FRACTION,
                      limit: float = LIMIT) -> str | None:
    """The warning text when the measure exceeds ``limit``, else None."""
    measured = hot_start_ratio(problem, records, window, current, fraction)
    if measured is None or measured[1] <= limit:
        return None
    steps, ratio = measured
    return (f"the run's first {steps} steps trained at {ratio:.1f}x the optimization time "
            f"(sum of learning rates) that the values tuned by then give those steps (limit "
            f"{limit:g}): it started hotter than what it found, and from such starts online "
            "tuning is not reliable (docs/online.md); rerun from a smaller initial learning "
            "rate: online tuning raises a too small one reliably")


__all__ = ["FRACTION", "LIMIT", "hot_start_ratio", "hot_start_warning", "optimization_time"]
