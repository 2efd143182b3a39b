"""The online rescue of a broken start: start over from theta_0 a decade cooler.

An online run trains once, so a start whose first window diverges has nothing to go back to
(the guard refuses it: ``Start from safer values ...``), and a start whose first window trains
the model far worse than not training it leaves the run to tune from a wrecked model. With
``rescue = n`` (:class:`~hyperdiff.tuner.online_plan.OnlinePlan`) the first window of a try,
trained at ``lam`` from theta_0, is *broken* when

- the guard fails it (a non-finite or absurd loss, a non-finite hypergradient), or
- its mean validation loss ``L`` is above the untrained model's ``U`` (theta_0, same batch) by
  more than :data:`LOSS_MARGIN` of ``max(|U|, 1)``: ``L > U + 0.5 max(|U|, 1)``, or
- its hypergradient norm is chaotic: above
  :data:`~hyperdiff.tuner.global_phase.CHAOTIC_RATIO` x ``max(|L|, 1)``.

The offline test (:func:`~hyperdiff.tuner.global_phase.broken_start`, ``L >= U``) judges a
whole training; one window of K steps from a small start is still at ``U`` up to noise (the
suite's shapes_cnn from its own start: 2.78 after 5 steps against 2.32 untrained, where a
start 100x too large on its other tasks reaches 1.75-2.6x ``U``; docs/online.md), hence the
margin. A broken try's window is recorded as failed (its steps and time stay in the history),
and the run starts over from theta_0 at step 0 with the learning rate divided by
:data:`FACTOR` (10; :func:`~hyperdiff.tuner.hot_start.cooled`: a schedule's peak or the
scalar hyperparameter that ``lr`` names), a fresh outer optimizer at full outer learning rate
and a fresh loss reference, at most ``n`` times (``n = 3``: down to 1000x); if the last try is
broken too (or the next cut would leave the learning rate's constraint), the run ends with one
error naming every learning rate tried. A start whose first window is not broken runs exactly
as without the rescue.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.errors import HyperdiffError, NonFiniteError
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.tuner.global_phase import chaotic
from hyperdiff.tuner.history import StepRecord
from hyperdiff.tuner.hot_start import cooled
from hyperdiff.tuner.online_run import Loop, OnlineRun
from hyperdiff.wording import option

FACTOR = 10.0  # each try's learning rate over the next one's
LOSS_MARGIN = 0.5  # a first window above U + LOSS_MARGIN * max(|U|, 1) is broken
TRIES = 3  # the default number of cuts online (a start up to 1000x too large)


def lr_name(problem: Problem) -> str | None:
    """The hyperparameter that a rescue cuts: a schedule's ``peak`` or the scalar
    hyperparameter that the ``lr`` coefficient names; None where there is none (a number,
    per-tensor values, a callable: nothing to cut, so no rescue)."""
    coef = problem.optimizer.coefficients.get("lr")
    if isinstance(coef, Schedule):
        return coef.names["peak"]
    if isinstance(coef, str) and coef in problem.hparams.raw and \
            problem.hparams.raw[coef].numel() == 1:
        return coef
    return None


def broken_window(val_loss: float, grad_norm: float, untrained: float) -> str:
    """Why a try's first window (mean validation loss ``val_loss``, raw hypergradient norm
    ``grad_norm``) is broken against the untrained model's loss ``untrained``, or ``""``
    (module doc).

    >>> broken_window(2.78, 1.75, 2.32)
    ''
    >>> print(broken_window(12.3, 13.2, 4.75))
    first window's validation loss 12.3 > U + 0.5 max(|U|, 1), U = 4.75 the untrained model's
    >>> print(broken_window(0.5, 2e23, 1.1))
    its hypergradient norm 2e+23 is above 1e+03 x max(|validation loss| 0.5, 1): chaotic
    """
    if math.isfinite(untrained) and not (
            math.isfinite(val_loss)
            and val_loss <= untrained + LOSS_MARGIN * max(abs(untrained), 1.0)):
        return (f"first window's validation loss {val_loss:.3g} > U + {LOSS_MARGIN:g} max(|U|, "
                f"1), U = {untrained:.3g} the untrained model's")
    return chaotic(grad_norm, val_loss)


def at_start(run: OnlineRun, history: Sequence[StepRecord]) -> bool:
    """Whether ``run``'s current window is a try's first: it starts at step 0 and no window
    of the run has succeeded (a hot-start restart comes after successes: not a try)."""
    return (run.rescue > 0 and run.span[0] == 0 and lr_name(run.problem) is not None
            and not any(r.status == "ok" for r in history))


def leading_failures(history: Sequence[StepRecord]) -> int:
    """The failed records before the history's first ok one: the rescued tries."""
    return next((i for i, r in enumerate(history) if r.status == "ok"), len(history))


def start_over(run: OnlineRun, loop: Loop, message: str) -> str:
    """After the guard put back the failed try's start (``message``: its note), cut its
    learning rate by :data:`FACTOR` and make that the next try: the guard's good point, at
    full outer learning rate, with no loss reference yet. The training state is theta_0
    already (a failed window is never kept). Returns the record's message.

    Raises:
        NonFiniteError: when the try was the last of ``run.rescue`` cuts.
    """
    name = lr_name(run.problem)
    assert name is not None  # at_start() checked it
    tried = [float(r.hparams[name]) for r in loop.history[:leading_failures(loop.history)]]
    tried.append(float(loop.hparams.natural(loop.raw)[name]))
    cut = _cooler(run, loop) if run.rescues < run.rescue else None
    if cut is None:
        bound = "" if run.rescues >= run.rescue else (
            f"; {name} cannot be cut {FACTOR:g}x within its constraint")
        raise NonFiniteError(
            f"{run.caller}: the start failed at each of its {len(tried)} tries, with {name} = "
            f"{', '.join(f'{v:.3g}' for v in tried)} (each a {FACTOR:g}x cut of the one before; "
            f"{option('OnlinePlan(rescue=...)', 'outer.rescue')} = {run.rescue}{bound}); the "
            f"last: {message.partition('; restored the')[0]}. Start from a smaller learning "
            "rate, or check the model and data")
    run.rescues += 1
    loop.set_raw(cut)
    loop.guard.good = {"raw": loop.raw, "outer": copy.deepcopy(loop.optimizer.state_dict())}
    loop.guard.reference.clear()
    return (f"{message.partition('; restored the')[0]}; broken start (try {len(tried)} of "
            f"{run.rescue + 1}, {name} = {tried[-1]:.3g}, steps {run.span[0]}..{run.span[1] - 1} "
            f"trained): starting over from theta_0 at step 0 with {name} = "
            f"{tried[-1] / FACTOR:.3g}")


def _cooler(run: OnlineRun, loop: Loop) -> dict[str, Tensor] | None:
    """``loop``'s raw values with the learning rate cut :data:`FACTOR` x, or None where the
    cut value leaves its constraint (an interval's lower end)."""
    try:
        return cooled(run.problem, loop.raw, FACTOR)
    except HyperdiffError:
        return None


def check_broken(run: OnlineRun, history: Sequence[StepRecord], val_loss: float,
                 grad_norm: float, untrained: Callable[[], Mapping[str, float]]) -> None:
    """Fail a try's first window (a ``NonFiniteError`` the guard takes as any failure) when
    :func:`broken_window` says why (``untrained()``: ``{"validation": U, ...}``, called only
    at a try's first window)."""
    if not at_start(run, history):
        return
    why = broken_window(val_loss, grad_norm, untrained()["validation"])
    if why:
        raise NonFiniteError(f"broken start: {why}")


__all__ = ["FACTOR", "LOSS_MARGIN", "TRIES", "at_start", "broken_window", "check_broken",
           "leading_failures", "lr_name", "start_over"]
