"""A shorter outer step where it lowers the learning rate (online: the short-horizon bias).

A window's hypergradient measures the validation loss at the window's end, a few steps ahead.
Over so short a horizon a smaller learning rate looks better than it is for the rest of the run
(it removes the last steps' noise now and pays for the slower progress later, beyond the
window: Wu et al. 2018), so the greedy signal is biased towards lowering the rate. Online, the
outer step keeps only a fraction ``keep`` of its move where the move lowers the learning rate
that the rest of the run trains with, and all of it elsewhere.

Which way is "lower" for each raw value ``u_i`` is the sign of its effect on the remaining
optimization time (the measure of :mod:`hyperdiff.tuner.hot_start`)::

    d_i = sign( d/du_i  sum_{start <= t < N} lr_t(u) )

with ``start`` the first step the new values train. A step ``delta = u' - u`` then becomes::

    delta_i <- keep * delta_i   where delta_i * d_i < 0,   else delta_i

(``d_i = 0``: values that the learning rate does not read, a weight decay or a penalty, move
as the outer optimizer says). The learning rate is the optimizer's ``lr`` coefficient: a
schedule (``peak`` and ``final`` raise it, a longer ``warmup`` lowers it early), or the name of
a hyperparameter (every entry raises it; of a ``per_step`` one, the entries of steps
``start..N-1``: a move of an entry already trained is kept whole); a number or a callable
has no direction and nothing is shortened.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.hparams.schedules import Schedule


def lr_direction(problem: Problem, raw: Mapping[str, Tensor], start: int
                 ) -> dict[str, Tensor] | None:
    """``sign(d T / du)`` by name, ``T = sum_{start <= t < N} lr_t`` the optimization time
    that steps ``start..N-1`` train with at raw values ``raw`` (shapes as ``raw``, float64 on
    the host); None when the learning rate is neither a schedule nor a hyperparameter's name,
    or no step is left."""
    coef = problem.optimizer.coefficients.get("lr")
    steps = problem.steps
    if not (isinstance(coef, (Schedule, str)) and start < steps):
        return None
    hp = problem.hparams
    # host float64 (a few numbers per schedule; float64 is not on every accelerator)
    leaves = {n: v.detach().to("cpu", torch.float64).requires_grad_() for n, v in raw.items()}
    with torch.enable_grad():
        hview = hp.view(leaves)
        if isinstance(coef, Schedule):
            total = coef.window(hview, start, steps).sum()
        elif hp[coef].kind == "per_step":  # entry t is step t's rate: the steps left only
            total = hview[coef][start:steps].sum()
        else:  # a scalar or per-tensor rate: every entry trains every step
            total = hview[coef].sum()
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(v) if g is None else g.sign()
            for (n, v), g in zip(leaves.items(), grads, strict=True)}


def shortened(before: Mapping[str, Tensor], after: Mapping[str, Tensor],
              direction: Mapping[str, Tensor], keep: float) -> dict[str, Tensor]:
    """``after`` with the move from ``before`` scaled by ``keep`` in the entries where it
    lowers the learning rate (``(after - before) * direction < 0``), by name.

    >>> up, down = {"lr": torch.tensor([0.0, 0.0])}, {"lr": torch.tensor([1.0, -1.0])}
    >>> shortened(up, down, {"lr": torch.tensor([1.0, 1.0])}, 0.5)["lr"]
    tensor([ 1.0000, -0.5000])
    """
    out = {}
    for name, new in after.items():
        old = before[name]
        move = new - old
        lowers = move * direction[name].to(move) < 0
        out[name] = torch.where(lowers, old + keep * move, new)
    return out
