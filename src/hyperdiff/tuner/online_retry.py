"""Retry a weak or hot online start from theta_0, its learning rate a decade warmer or cooler.

An online run has one training to climb or fall from its start: from 100x too small it spends
its early windows at a tiny rate while the outer steps raise it (about a factor e^0.7 a window),
and from 100x too large its first windows train the model fast and hot, after which the window
hypergradients describe that model (docs/online.md, "Starts 100x off"). Both show in the first
window, trained at ``lam`` from theta_0 (steps 0..K-1): its mean validation loss ``L`` against
the untrained model's ``U`` (same batch), and which way its hypergradient ``g`` (by name) moves
the learning rate. With ``d`` the signs of :func:`~hyperdiff.tuner.lowering.lr_direction` over
the whole run (``d_i > 0``: raising raw value ``i`` raises the optimization time), the descent
step ``-g`` raises the learning rate when ``r = sum_i -g_i d_i > 0``. With ``retry = n``
(:class:`~hyperdiff.tuner.online_plan.OnlinePlan`) the first window of a try is

- *weak* when ``(U - L) N / K < WEAK max(|U|, 1)`` (at its pace the run's N steps would remove
  under 10% of the untrained loss; 0.5% in the first window of N = 100 steps, K = 5) and
  ``r > 0``: the run starts over from theta_0 at step 0 with the learning rate x :data:`FACTOR`;
- *hot* when ``L > U + HOT max(|U|, 1)`` (it trained the model 5% worse than not training it)
  and ``r < 0``: the same with the learning rate / :data:`FACTOR`.

The suite's tasks (``benchmarks/online_seed_means.py``, 3 training seeds, K = 5, N = 60 to
150), at the first window's pace over the run: their own starts remove 40% of ``max(|U|, 1)``
or more (gru_seq 40-44%, its warmup's first 5 steps), but for shapes_cnn at one training seed,
whose first window ends 3.0% above ``U`` with a hypergradient asking for a smaller rate; the
starts 10x too small remove 3.6-390%
(gru_seq 3.6-5.4%, tabular_mlp 18%, shapes_cnn 17-22%, char_lm 22%), 100x too small -5-52%;
gru_seq from 100x too large ends 7-17% above ``U``. Hence the two margins, which are narrow
on both sides (docs/online.md, "Starts 100x off": shapes_cnn's own start at its
problem's own seed ends 20% above ``U``, and is retried cooler).

The tries go one way: the first fixes it (``run.retries``: +k after k warmer tries, -k after k
cooler), at most ``n`` of them, and a warmer try never follows the rescue's cut
(:mod:`~hyperdiff.tuner.online_rescue`, whose broken test comes first). Each try's window is a
failed record (its steps and time stay in the history, the outer learning rate is not cut) and
the next try starts as the rescue's do: at the guard's good point, a fresh outer optimizer and
no loss reference. A start whose first window is neither weak nor hot (or whose learning rate
would leave its constraint) runs exactly as without the rule.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError, NonFiniteError
from hyperdiff.tuner.guard import start_values
from hyperdiff.tuner.history import StepRecord
from hyperdiff.tuner.hot_start import cooled
from hyperdiff.tuner.lowering import lr_direction
from hyperdiff.tuner.online_rescue import leading_failures, lr_name
from hyperdiff.tuner.online_run import Loop, OnlineRun
from hyperdiff.wording import option

FACTOR = 10.0  # each try's learning rate over the one before (warmer) or under it (cooler)
WEAK = 0.1  # a first window whose pace over the run removes under WEAK max(|U|, 1) is weak
HOT = 0.05  # one above U + HOT * max(|U|, 1) is hot
TRIES = 2  # the default online: a start up to 100x off either way


def start_verdict(val_loss: float, untrained: float, raises: float, pace: float) -> int:
    """+1 for a weak first window (validation loss ``val_loss``, untrained ``untrained``, its
    descent step raising the learning rate by ``raises > 0``, ``pace = N / K`` the run's steps
    over the window's), -1 for a hot one, else 0.

    >>> start_verdict(1.1115, 1.112, 0.0003, 20), start_verdict(1.087, 1.112, 0.02, 20)
    (1, 0)
    >>> start_verdict(1.295, 1.112, -0.57, 20), start_verdict(2.391, 2.32, -0.95, 20)
    (-1, 0)
    """
    scale = max(abs(untrained), 1.0)
    if not (math.isfinite(val_loss) and math.isfinite(untrained)):
        return 0
    if (untrained - val_loss) * pace < WEAK * scale and raises > 0:
        return 1
    if val_loss > untrained + HOT * scale and raises < 0:
        return -1
    return 0


def raising(run: OnlineRun, raw: Mapping[str, Tensor], grad: Mapping[str, Tensor]) -> float:
    """``r = sum_i -g_i d_i``: positive where the descent step on ``grad`` raises the run's
    learning rate (module doc); 0 without a learning-rate direction."""
    direction = lr_direction(run.problem, raw, 0)
    if direction is None:
        return 0.0
    return -sum(float((grad[n].detach().to("cpu").double() * d).sum())
                for n, d in direction.items())


def at_first_window(run: OnlineRun, history: Sequence[StepRecord]) -> bool:
    """Whether ``run``'s current window is a try's first and a retry is left: step 0, no ok
    window yet, a learning rate to scale, fewer than ``run.retry`` tries made."""
    return (abs(run.retries) < run.retry and run.span[0] == 0
            and lr_name(run.problem) is not None
            and not any(r.status == "ok" for r in history))


def check_start(run: OnlineRun, loop: Loop, val_loss: float, grad: Mapping[str, Tensor],
                losses: Callable[[], Mapping[str, float]]) -> None:
    """Fail a try's weak or hot first window (a ``NonFiniteError`` the guard takes, uncounted)
    and leave the next try's raw values in ``run.pending_retry``; nothing otherwise
    (``losses()``: ``{"validation": U, ...}``, called only at a try's first window)."""
    run.pending_retry = None
    if not at_first_window(run, loop.history):
        return
    raw, untrained = loop.raw, losses()["validation"]
    pace = run.problem.steps / (run.span[1] - run.span[0])
    verdict = start_verdict(val_loss, untrained, raising(run, raw, grad), pace)
    if verdict == 0 or verdict * run.retries < 0 or (verdict > 0 and run.rescues > 0):
        return  # the tries go one way, and never warmer after the rescue's cut
    try:
        run.pending_retry = cooled(run.problem, dict(raw), FACTOR ** -verdict)
    except HyperdiffError:
        return  # the next value would leave its constraint: go on from this one
    scale = max(abs(untrained), 1.0)
    why = (f"weak start: the first window removed {(untrained - val_loss) / scale:.2%} of "
           f"max(|U|, 1) (validation loss {val_loss:.4g}, U = {untrained:.4g} the untrained "
           f"model's), at that pace {(untrained - val_loss) * pace / scale:.1%} in the run's "
           f"{run.problem.steps} steps (under {WEAK:.0%}), and its hypergradient asks for a "
           "larger learning rate"
           if verdict > 0 else
           f"hot start: the first window's validation loss {val_loss:.4g} > U + {HOT:g} "
           f"max(|U|, 1), U = {untrained:.4g} the untrained model's, and its hypergradient "
           "asks for a smaller learning rate")
    raise NonFiniteError(why)


def retry_start(run: OnlineRun, loop: Loop, message: str) -> str:
    """After the guard put back the try's start (``message``: its note), make
    ``run.pending_retry`` the next try: the guard's good point, at full outer learning rate,
    with no loss reference yet (the training state is theta_0 already: a failed window is
    never kept). Returns the record's message."""
    assert run.pending_retry is not None  # check_start set it in this step
    name = lr_name(run.problem)
    assert name is not None  # at_first_window() checked it
    tried = float(loop.hparams.natural(loop.raw)[name])
    loop.set_raw(run.pending_retry)
    now = float(loop.hparams.natural(loop.raw)[name])
    run.pending_retry = None
    run.retries += 1 if now > tried else -1
    loop.guard.good = {"raw": loop.raw, "outer": copy.deepcopy(loop.optimizer.state_dict())}
    loop.guard.reference.clear()
    tries = leading_failures(loop.history) + 1
    return (f"{message.partition('; restored the')[0]}; try {tries}, {name} = {tried:.3g}, "
            f"steps {run.span[0]}..{run.span[1] - 1} trained: starting over from theta_0 at "
            f"step 0 with {name} = {now:.3g} ({abs(run.retries)} of "
            f"{run.retry} {'warmer' if run.retries > 0 else 'cooler'} tries)")


def stuck_advice(run: OnlineRun, loop: Loop, raw: Mapping[str, Tensor]) -> str:
    """What the guard advises when it gives up on a window that trained at the last good
    values themselves (``raw`` equal to the guard's good point): an online window retried after
    a failure trains at those values again, so a smaller outer step cannot help. It names the
    values, and the weak start's warmer tries where they set the learning rate; ``""`` for a
    window that trained at other values (the guard's own advice holds)."""
    good = loop.guard.good
    if good is None:
        return ""
    trained = run.problem.raw_tensors(good["raw"])  # as the window's raw values are
    if any(not torch.equal(raw[n], trained[n]) for n in raw):
        return ""
    start, stop = run.span
    text = (f"The window of steps {start}..{stop - 1} failed at the last good step's values "
            f"themselves ({start_values(loop.hparams, dict(raw))}), which a smaller outer step "
            "does not change")
    name = lr_name(run.problem)
    if run.retries > 0 and name is not None and loop.history:
        first = float(loop.history[0].hparams[name])
        now = float(loop.hparams.natural(dict(raw))[name])
        text += (f"; {name} = {now:.3g} was set by {run.retries} warmer "
                 f"{'try' if run.retries == 1 else 'tries'} of a weak start from {first:.3g} "
                 f"({option('OnlinePlan(retry=...)', 'outer.retry')} = {run.retry})")
        return (f"{text}. Start from a learning rate between {first:.3g} and {now:.3g}, or "
                f"set {option('retry=0', 'outer.retry = 0')} to keep {first:.3g}")
    return f"{text}. Start from safer values (e.g. a smaller learning rate)"


__all__ = ["FACTOR", "HOT", "TRIES", "WEAK", "at_first_window", "check_start", "raising",
           "retry_start", "start_verdict", "stuck_advice"]
