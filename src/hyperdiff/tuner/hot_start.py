"""Did an online run start hotter than the values it found? Measured at 10% of the run.

Online tuning moves the learning rate reliably *up* from a too small start: a slow beginning
is made up later. From a too large start it is not reliable: the first steps train the model
fast at the large rate, and the signals after them describe that model, which a fresh training
with the tuned values never becomes (``benchmarks/horizon_starts.py``, docs/online.md). The
measure, at the first window that ends at or after ``fraction * N`` steps (step ``M``)::

    ratio = sum_{t < M} lr_t(lam_w(t)) / sum_{t < M} lr_t(lam_M)

the optimization time the run trained in its first M steps (each window ``w`` at the values
``lam_w`` it used) over the one that the values tuned by step M (those after the update that
follows the window ending at M), ``lam_M``, give those steps. Above :data:`LIMIT` (2) the run
trained its beginning hotter than its own tuned values would. The tuner then
(``hot_start="restart"``) starts over from theta_0 at step 0 with ``lam_M`` whose learning rate
is divided by ``ratio`` (:func:`cooled`): a start below what it found, from where online tuning
is reliable; or it only warns (``"warn"``). The learning rate is the optimizer's ``lr``
coefficient: a schedule (:mod:`hyperdiff.hparams.schedules`, its ``peak`` is scaled) or the name of
a scalar hyperparameter; for other kinds (a number, per-tensor or per-step values, a callable)
nothing is measured. Nor is a run that reaches M before its :data:`MIN_WINDOWS`-th (3rd)
window: ``lam_M`` is then one or two outer steps from the start, and Adam's first steps move
every value by the full outer learning rate whatever the signal's strength, so the ratio
measures the outer step size, not a hot start (and dividing by it lowers the learning rate a
second time: docs/online.md, "Cost and quality").
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import initial_state
from hyperdiff.errors import HyperdiffError
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.tuner.history import StepRecord, natural_values
from hyperdiff.tuner.online_run import Loop, OnlineRun
from hyperdiff.tuner.windows import window_stop
from hyperdiff.wording import option

_LOG = logging.getLogger("hyperdiff.online")

FRACTION = 0.1
LIMIT = 2.0
MIN_WINDOWS = 3  # the measuring window must be at least the run's third
MODES = ("restart", "warn", "ignore")


def optimization_time(problem: Problem, values: Mapping[str, Any], start: int, stop: int
                      ) -> float | None:
    """``sum_{start <= t < stop} lr_t`` at natural ``values`` (a record's ``hparams``), or
    None where the learning rate is not a schedule or a scalar hyperparameter."""
    coef = problem.optimizer.coefficients.get("lr")
    if isinstance(coef, Schedule):
        natural = {n: torch.tensor(float(values[n]), dtype=torch.float64, device="cpu")
                   for n in coef.names.values()}  # host numbers from the records: host math
        return float(coef.window(natural, start, stop).sum())
    if isinstance(coef, str) and isinstance(values.get(coef), float):
        return float(values[coef]) * (stop - start)
    return None


def hot_start_ratio(problem: Problem, records: Sequence[StepRecord], window: int,
                    current: Mapping[str, Any] | None = None, fraction: float = FRACTION,
                    growth: float = 0.0) -> tuple[int, float] | None:
    """``(M, ratio)`` of the module doc from the run's records (``current``: the natural
    values now, used when no record follows the window that reaches M), or None before the
    run has trained ``fraction * N`` steps or where the measure is not taken."""
    target = math.ceil(fraction * problem.steps)
    realized, stop = 0.0, 0
    for record in records:
        if record.status != "ok":
            continue  # a failed window was discarded and trained again
        start, stop = stop, window_stop(stop, problem.steps, window, growth)
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


def cooled(problem: Problem, raw: dict[str, Tensor], factor: float) -> dict[str, Tensor]:
    """``raw`` with the learning rate divided by ``factor``: a schedule's ``peak``, or the
    scalar hyperparameter that the ``lr`` coefficient names."""
    coef = problem.optimizer.coefficients["lr"]
    if isinstance(coef, Schedule):
        name = coef.names["peak"]
    elif isinstance(coef, str):
        name = coef
    else:  # optimization_time measures no other kind, so no restart asks for it
        raise HyperdiffError(f"cooled: the learning rate must be a schedule or a hyperparameter "
                             f"name (got {type(coef).__name__})")
    hparams = problem.hparams.with_raw(raw)
    value = float(hparams.natural()[name]) / factor
    return hparams.with_natural(**{name: value}).raw


def hot_start_message(steps: int, ratio: float, mode: str, restarted: bool) -> str:
    """What the tuner logs (and keeps in its warnings) for a hot start of ``ratio`` at step
    ``steps`` with ``hot_start=mode``."""
    found = (f"the run's first {steps} steps trained at {ratio:.2f}x the optimization time "
             f"(sum of learning rates) that the values tuned by then give those steps (limit "
             f"{LIMIT:g}): it started hotter than what it found, and from such starts online "
             "tuning is not reliable (docs/online.md)")
    if restarted:
        return (f"{found}; restarted from theta_0 at step 0 with those values and the "
                f"learning rate divided by {ratio:.2f}")
    if mode == "restart":  # the measuring window was the run's last one
        return f"{found}; the run ended with that window: rerun from a smaller initial rate"
    restart = option("hot_start='restart'", 'outer.hot_start = "restart"')
    return f"{found}; rerun from a smaller initial learning rate, or use {restart}"


def measure_hot_start(run: OnlineRun, loop: Loop, record: StepRecord, start: int,
                      stop: int) -> bool:
    """At the window (``record``, steps ``start .. stop-1``) that reaches :data:`FRACTION` of
    the run, first pass only: take the measure into ``run.hot_start_measure`` and log the
    message above :data:`LIMIT`; True when the run is to start over (``hot_start="restart"``
    and the window is not the run's last)."""
    target = math.ceil(FRACTION * run.problem.steps)
    if run.hot_start == "ignore" or run.restarted or not start < target <= stop:
        return False
    if sum(r.status == "ok" for r in loop.history) + 1 < MIN_WINDOWS:
        return False  # too few outer steps for the measure (module doc)
    current = natural_values(loop.hparams, loop.raw)
    run.hot_start_measure = hot_start_ratio(run.problem, [*loop.history, record], run.window,
                                            current, growth=run.growth)
    if run.hot_start_measure is None or run.hot_start_measure[1] <= LIMIT:
        return False
    run.restarted = run.hot_start == "restart" and stop < run.problem.steps
    _LOG.warning("%s: %s", run.caller, hot_start_warnings(run)[0])
    return run.restarted


def restart_cooler(run: OnlineRun, loop: Loop) -> None:
    """Start ``run`` over from theta_0 at step 0 (parameters, buffers, optimizer state,
    tangents) with ``loop``'s current values, the learning rate divided by the measured ratio;
    that becomes the divergence guard's last good point."""
    assert run.hot_start_measure is not None
    raw = cooled(run.problem, loop.raw, run.hot_start_measure[1])
    loop.set_raw(raw)
    with torch.no_grad():
        run.state = initial_state(run.problem, differentiable=False)
    run.tangent, run.inner_step = None, 0
    loop.guard.succeeded({"raw": loop.raw,
                          "outer": copy.deepcopy(loop.optimizer.state_dict())})


def hot_start_warnings(run: OnlineRun) -> tuple[str, ...]:
    """The hot-start message of ``run``, if its measure exceeded :data:`LIMIT`."""
    measured = run.hot_start_measure
    if measured is None or measured[1] <= LIMIT:
        return ()
    return (hot_start_message(*measured, run.hot_start, run.restarted),)


__all__ = ["FRACTION", "LIMIT", "MODES", "cooled", "hot_start_message", "hot_start_ratio",
           "hot_start_warnings", "measure_hot_start", "optimization_time", "restart_cooler"]
