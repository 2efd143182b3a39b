"""When the outer loop stops, and which of its steps it returns.

:class:`Stopping` holds the stopping rules. The best step is ranked by one of two losses:
``"val"``, the validation loss the hypergradient sees (averaged over folds and samples), or
``"selection"``, the loss on a split it never sees. Without a selection split every step is
ranked by ``"val"``. With one and ``tie_steps = k > 0``, steps ``0 .. g + k`` are ranked by
``"val"`` (``g`` the plan's first gradient step: 0, or after a global phase the step after its
points, so the phase's points do not use up the tied steps): the start, the phase's points and
the steps whose values come from tied updates only (:func:`tied`, the updates of steps
``g .. g + k - 1``) have one degree of freedom per hyperparameter, like a grid over a shared
value, and the validation loss is the larger, less noisy estimate. Every later step must beat
the best so far on ``"selection"``, the split that guards against fitting the validation set
with many free entries.

Early stopping counts steps without a new best. With ``travel = k > 0`` it skips the steps in
which a value is still travelling (:func:`travelling`): a scalar log or interval value whose
raw value ``u`` moved the same way at each of the last ``k`` steps, on average by at least the
outer learning rate per step (the names the global phase explores are watched; a one-entry
vector among them, ``per_feature([0.1])``, is recorded as a list, whose moves the test reads
as none, so it never travels)::

    d_j = u_{s-j+1} - u_{s-j}  (j = 1..k; the records' values)
    travelling at s  <=>  all d_j > 0 or all d_j < 0,  and  |sum_j d_j| >= sum_j lr_{s-j}

With ``signstep`` a value moves by ``lr x scale`` while its hypergradient keeps its sign and
stands still on a flip, so on noise (half the signs flip) it does not travel; a value carried
far by a steady sign (a weight decay two decades off) does, and the run waits for it.

With ``chaos_ratio = r`` the ranking passes over a chaotic step (:func:`calm`): one whose
hypergradient norm is above ``r x max(|L_val|, 1)``, a training near the edge of stability,
whose loss is one lucky or unlucky draw of a wide spread over minibatch orders (a learning rate
that trains well on one order and diverges on another). A calm step is ranked above every
chaotic one; among steps of the same kind the lower loss wins. So a chaotic step becomes the
best only while no calm step has been, and it does not reset early stopping's count once one
has. A step without a hypergradient (a plain point of the global phase) is calm.

With ``extend = e > 0`` the budget itself waits too: at ``max_steps`` and after, the run goes
on while a value travels (the same test, ``travel`` steps; the plan asks only where its step
does not decay), up to ``max_steps + e`` steps, and the stop reason counts the extra steps.
A start one or two decades off spends most of its budget travelling at the outer optimizer's
largest step (``signstep``: 0.5 log units a step), so the budget alone would stop it on the way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hyperdiff.errors import fail, nonnegative_int, positive_float, positive_int
from hyperdiff.hparams.hyperparams import HyperParameters

CHAOS_RATIO = 30.0
"""The ratio :attr:`Stopping.chaos_ratio` was measured at (off by default). On the suite's 36
offline runs of its four 4-hyperparameter tasks at their own lengths, every pick retrained on
10 report seeds, it changed 4 picks: test loss x0.466 (``shapes_cnn`` from a learning rate 10x
too small, whose pick diverged on one of the ten seeds), x0.988, x0.997 and x1.0003. On
``char_lm`` at 3x its length, where the hypergradient is chaotic at most steps of a training
that is not, it changed 4 of 4 picks for the worse: x1.042, x1.028, x1.002, x1.003
(docs/driver.md, "Chaotic steps")."""


@dataclass(frozen=True)
class Stopping:
    """When :meth:`HyperOptimizer.run` stops (the first rule that fires).

    Attributes:
        max_steps: budget of outer steps (failed steps count).
        max_time_s: wall-time budget in seconds (``None``: none).
        patience: stop after this many steps without a new best selection loss (``None``: off).
        min_delta: a new best must beat the old one by more than this.
        grad_tol: converged when the hypergradient norm falls below this (0: off).
        step_tol: converged when no raw value moved by more than this in a step (0: off).
        travel: early stopping skips a step in which an explored value still travels over the
            last ``travel`` steps (:func:`travelling`; 0: off). Read by the
            :class:`~hyperdiff.tuner.offline_plan.OfflinePlan` only (a meta plan counts every
            step); an online plan reads no rule here and refuses any but the defaults.
        extend: at most this many steps past ``max_steps`` while a value still travels
            (module doc; 0: off). Read by the offline plan only, like ``travel``.
        chaos_ratio: a step whose hypergradient norm is above this many times
            ``max(|validation loss|, 1)`` is chaotic and ranked below every calm step (module
            doc; ``None``: off, the default; :data:`CHAOS_RATIO` is the measured value). Read
            by the offline plan only (a meta plan ranks by loss).
    """

    max_steps: int = 50
    max_time_s: float | None = None
    patience: int | None = 10
    min_delta: float = 0.0
    grad_tol: float = 0.0
    step_tol: float = 0.0
    travel: int = 3
    extend: int = 0
    chaos_ratio: float | None = None

    def __post_init__(self) -> None:
        positive_int("Stopping", "max_steps", self.max_steps)
        if self.chaos_ratio is not None:
            positive_float("Stopping", "chaos_ratio", self.chaos_ratio)
        nonnegative_int("Stopping", "travel", self.travel)
        nonnegative_int("Stopping", "extend", self.extend)
        if self.max_time_s is not None:
            positive_float("Stopping", "max_time_s", self.max_time_s)
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(
                self.patience, int) or self.patience < 1):
            raise fail("Stopping", "patience", "a positive int, or None to turn early stopping "
                       "off", self.patience)
        for name in ("min_delta", "grad_tol", "step_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0.0 <= value < math.inf
            ):
                raise fail("Stopping", name, "a finite number >= 0", value)

    def reason(self, *, steps: int, elapsed: float, since_best: int,
               has_selection: bool, travels: bool = False) -> str | None:
        """The first rule that fires after ``steps`` outer steps, ``elapsed`` seconds and
        ``since_best`` steps without a new best, or ``None`` to go on. ``travels``: a value
        still travels at the last step, which holds the budget back by up to ``extend``
        steps."""
        if steps >= self.max_steps and not (travels and steps < self.max_steps + self.extend):
            if steps == self.max_steps:
                return f"budget: {self.max_steps} outer steps"
            return (f"budget: {self.max_steps} outer steps + {steps - self.max_steps} while a "
                    f"value travelled (stop.extend = {self.extend})")
        if self.max_time_s is not None and elapsed >= self.max_time_s:
            return f"time: {self.max_time_s:g} s"
        if self.patience and since_best >= self.patience:
            which = "selection" if has_selection else "validation"
            return f"early stopping: no better {which} loss for {self.patience} steps"
        return None


def travelling(records: Sequence[Any], hparams: HyperParameters, names: Sequence[str],
               window: int) -> bool:
    """Whether a value of ``names`` (one entry each; a one-entry vector, a list in the
    records, never counts) travels at the last of ``records`` (step
    records; the last ``window + 1`` are used): its raw value moved the same way at each of
    the last ``window`` steps, by at least their outer learning rates in total (module doc).
    A failed step among them moves nothing.

    >>> import hyperdiff as hd
    >>> from types import SimpleNamespace as R
    >>> hp = hd.HyperParameters(wd=hd.scalar(0.01))
    >>> steady = [R(hparams={"wd": 0.01 * 1.1 ** i}, lr=0.05, status="ok") for i in range(4)]
    >>> travelling(steady, hp, ["wd"], 3)     # +0.095 log units a step, against lr 0.05
    True
    >>> travelling(steady, hp, ["wd"], 4)     # four moves need five records
    False
    """
    last = list(records)[-(window + 1):]
    if window < 1 or len(last) < window + 1 or any(r.status != "ok" for r in last):
        return False
    reach = sum(r.lr for r in last[:-1])
    for name in names:
        natural = torch.tensor([r.hparams[name] for r in last], dtype=torch.float64,
                               device="cpu")  # the records' numbers
        moves = torch.diff(hparams[name].constraint.to_raw(natural))
        if (bool((moves > 0).all()) or bool((moves < 0).all())) and (
                abs(float(moves.sum())) >= reach):
            return True
    return False


def settled_since(records: Sequence[Any], since: int, first: int, hparams: HyperParameters,
                  names: Sequence[str], window: int) -> int:
    """How many of the last ``since`` records (the steps since the best) count for early
    stopping: those in which no value of ``names`` travels (:func:`travelling` over the
    records from step ``first`` on, the gradient phase's; ``window`` 0: all of them)."""
    if window == 0 or since == 0:
        return since
    count = 0
    for end in range(len(records) - since, len(records)):
        start = max(end - window, 0)
        phase = [r for r in records[start:end + 1] if r.step >= first]
        count += not travelling(phase, hparams, names, window)
    return count


def calm(grad_norm: float | None, val_loss: float | None, ratio: float | None) -> bool:
    """Whether a step is calm: its hypergradient norm at most ``ratio`` x ``max(|val_loss|,
    1)``; also without a hypergradient, a loss or a ``ratio`` (module doc).

    >>> calm(150.0, 0.64, 30.0), calm(0.3, 0.64, 30.0), calm(None, 0.64, 30.0)
    (False, True, True)
    >>> calm(float("inf"), 2.0, 30.0), calm(150.0, 0.64, None)
    (False, True)
    """
    if grad_norm is None or val_loss is None or ratio is None:
        return True
    return grad_norm <= ratio * max(abs(val_loss), 1.0)


def ranking_loss(step: int, tie_steps: int, has_selection: bool, first: int = 0) -> str:
    """``"val"`` or ``"selection"``: the loss that ranks outer ``step`` (see the module doc;
    ``first``: the plan's first gradient step, from which the tied steps count).

    >>> ranking_loss(3, 2, True), ranking_loss(3, 2, True, first=5), ranking_loss(8, 2, True, 5)
    ('selection', 'val', 'selection')
    """
    tied_values = tie_steps > 0 and step <= first + tie_steps
    return "selection" if has_selection and not tied_values else "val"


def ranking_name(tie_steps: int, has_selection: bool, first: int = 0) -> str:
    """How the best step is picked, for reports (``first`` as in :func:`ranking_loss`)."""
    if not has_selection:
        return "val_loss"
    if tie_steps and first:
        return (f"val_loss (global phase and tied steps <= {first + tie_steps}), then "
                "selection_loss")
    if tie_steps:
        return f"val_loss (tied steps <= {tie_steps}), then selection_loss"
    return "selection_loss"


def tied(grad: dict[str, Tensor], hparams: HyperParameters | None = None
         ) -> dict[str, Tensor]:
    """Each hyperparameter's gradient replaced by its mean over its entries (same shape).

    A discrete hyperparameter of ``hparams`` gets exactly 0: its raw values are logits, whose
    gradient through the softmax sums to 0 over the entries (moving every logit by one amount
    changes no probability), so its float mean is a rounding residue (~1e-17) whose sign a
    sign-based outer step would follow by its full length.

    >>> import hyperdiff as hd
    >>> hp = hd.HyperParameters(act=hd.categorical(["a", "b", "c"]), wd=hd.per_feature([0.1, 0.1]))
    >>> g = {"act": torch.tensor([0.1, 0.2, -0.3]), "wd": torch.tensor([1.0, 3.0])}
    >>> {n: v.tolist() for n, v in tied(g, hp).items()}
    {'act': [0.0, 0.0, 0.0], 'wd': [2.0, 2.0]}
    """
    def fixed_sum(name: str) -> bool:
        return hparams is not None and name in hparams and hparams[name].is_discrete

    return {name: torch.zeros_like(g) if fixed_sum(name) else g.mean().expand_as(g)
            for name, g in grad.items()}


__all__ = ["CHAOS_RATIO", "Stopping", "calm", "ranking_loss", "ranking_name", "settled_since",
           "tied", "travelling"]
