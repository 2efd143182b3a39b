"""A short global phase before the gradient phase: quasi-random points around the start.

With ``explore = k`` the offline loop's outer steps are (``u_0`` the start's raw values)::

    step 0          train at u_0 (the center of the box)
    step j <= k     train at u_0 + w * (2 p_j - 1) on the explored names, p_j in [0, 1]^d
                    the j-th point of a scrambled Sobol sequence (seed: the loop's seed),
                    w = decades * ln(10): +-``decades`` decades of a log value, the same
                    width in log-odds for an interval value
    after step k    the raw values become the best step's so far (the loop's ranking: the
                    selection loss), the outer optimizer starts afresh, and the gradient phase
                    runs steps k+1 ... with its own cosine schedule over the remaining steps
                    and its own early-stopping count (``patience`` steps from step k+1)

One coordinate per explored name, so ``d`` is the number of explored names. Explored: the
hyperparameters with one entry, whatever their kind (a scalar, and also a one-entry
``per_feature``, ``per_step``, ``per_tensor`` or ``per_element`` value), that are positive with
a log transform or in an interval (a learning rate, a weight decay, a schedule's fractions: the
few knobs that a start gets 10-100x wrong); vectors of more entries (per-feature penalties,
per-example weights: the gradient's domain; shifting all entries of ``reweight_digits``' 989
weights as one cost 31% of its test loss at 10 steps), free, softplus and discrete values stay
at the start.
A warm-start run has no phase (``OfflinePlan``: its steps train on from each other's theta_T,
so the points would be no independent trials).
Every step of the phase is an ordinary training with its record, so the guard, the ranking
and the checkpoint treat it as any other step; the points are a function of the seed and the
start alone, so a resumed run draws the same ones. The points train plainly (no hypergradient:
the gradient phase follows none of theirs; only step 0's decides whether the phase runs), at
1x a plain training instead of the method's 2-4x, to the same theta_T bit for bit; not with
discrete hyperparameters or a data-parallel method (``OfflinePlan.evaluate``).

The gradient phase starts from the best step, whose hypergradient a plain point has not
computed. When its first step fails there (a hypergradient or loss that is not finite on the
next minibatch seed), it starts over from the next step of :func:`start_order` and the failure
neither counts toward the guard's failures in a row nor cuts the outer learning rate; a
failure at the last of them is an ordinary one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

import torch
from torch import Tensor
from torch.quasirandom import SobolEngine

from hyperdiff.errors import fail, is_number, nonnegative_int
from hyperdiff.hparams.constraints import Interval, Positive
from hyperdiff.hparams.hyperparams import HyperParameters


def explored_names(hparams: HyperParameters) -> list[str]:
    """The names a global phase moves: log-positive and interval values with one entry, of
    any kind (a ``per_feature([0.1])`` too)."""
    return [name for name, spec in hparams.items()
            if not spec.is_discrete and math.prod(spec.shape) == 1 and (
        isinstance(spec.constraint, Interval)
        or (isinstance(spec.constraint, Positive) and spec.constraint.transform == "log"))]


def explore_points(hparams: HyperParameters, start: dict[str, Tensor], count: int,
                   decades: float, seed: int) -> list[dict[str, Tensor]]:
    """``count`` raw points in the box of +-``decades`` decades around ``start`` (module doc).

    Returns one dict of raw values per point (every name; the unexplored ones at ``start``).

    >>> import hyperdiff as hd
    >>> hp = hd.HyperParameters(lr=hd.scalar(0.1), w=hd.scalar(0.0, "free"))
    >>> points = explore_points(hp, hp.raw, 3, 1.0, seed=0)
    >>> all(0.01 <= float(p["lr"].exp()) <= 1.0 and float(p["w"]) == 0.0 for p in points)
    True
    """
    names = explored_names(hparams)
    if count == 0 or not names:
        return []
    width = decades * math.log(10.0)
    unit = SobolEngine(len(names), scramble=True, seed=seed).draw(count, dtype=torch.float64)
    points = []
    for row in unit:
        point = {n: v.clone() for n, v in start.items()}
        for name, p in zip(names, row.tolist(), strict=True):
            point[name] = start[name] + width * (2.0 * p - 1.0)
        points.append(point)
    return points


CHAOTIC_RATIO = 1e3
"""A start whose hypergradient norm (raw units) exceeds this many times ``max(|L_val|, 1)`` is
chaotic: the loss would change by 1000x itself per unit of a raw (log) value, and no step of
finite length follows such a derivative (healthy starts of the suite's tasks measure 0.006-0.8,
a learning rate 100x too large on its GRU 1e23)."""


def broken_start(record: Any, untrained: Mapping[str, float]) -> str:
    """Why step 0's ``record`` is a broken start, or ``""``: its selection loss (else its
    validation loss) is not below the untrained model's (``untrained``: ``{"validation": U,
    "selection": U_sel}``), so its training made the model no better than not training; or its
    hypergradient norm is above :data:`CHAOTIC_RATIO` x ``max(|validation loss|, 1)``, so the
    training is chaotic in the hyperparameters.

    >>> from types import SimpleNamespace as R
    >>> print(broken_start(R(selection_loss=None, val_loss=2.5, grad_norm=0.1),
    ...                    {"validation": 1.1}))
    the start trained to validation loss 2.5 >= 1.1, the untrained model's
    >>> broken_start(R(selection_loss=0.4, val_loss=2.5, grad_norm=0.1),
    ...              {"validation": 1.1, "selection": 1.0})
    ''
    >>> print(broken_start(R(selection_loss=0.4, val_loss=0.5, grad_norm=2e23),
    ...                    {"validation": 1.1, "selection": 1.0}))
    its hypergradient norm 2e+23 is above 1e+03 x max(|validation loss| 0.5, 1): chaotic
    """
    kind, loss = (("selection", record.selection_loss) if record.selection_loss is not None
                  else ("validation", record.val_loss))
    reference = untrained.get(kind)
    if loss is not None and reference is not None and math.isfinite(reference) and not (
            math.isfinite(loss) and loss < reference):
        return (f"the start trained to {kind} loss {loss:.3g} >= {reference:.3g}, the untrained "
                "model's")
    if record.grad_norm is None or record.val_loss is None:
        return ""
    return chaotic(record.grad_norm, record.val_loss)


def chaotic(grad_norm: float, val_loss: float) -> str:
    """Why a training with this raw hypergradient norm and finite validation loss is chaotic
    in its hyperparameters (the norm is not finite, or above :data:`CHAOTIC_RATIO` x
    ``max(|val_loss|, 1)``), or ``""`` (also when ``val_loss`` is not finite: that is another
    failure)."""
    if math.isfinite(val_loss) and (
            not math.isfinite(grad_norm) or grad_norm > CHAOTIC_RATIO * max(abs(val_loss), 1.0)):
        return (f"its hypergradient norm {grad_norm:.3g} is above {CHAOTIC_RATIO:.0e} x "
                f"max(|validation loss| {abs(val_loss):.3g}, 1): chaotic")
    return ""


WEAK_FRACTION = 0.2
"""A start whose training removes less than this fraction of the untrained model's loss is
weak (:func:`weak_start`). The suite's own starts remove 27-87% (``shapes_cnn`` 27%,
``char_lm`` 43%, ``tabular_mlp`` 47%); its learning rates 100x too small 0.6-13% (``gru_seq``
0.6%, ``char_lm`` 2.5%, ``tabular_mlp`` 3.6%, ``shapes_cnn`` 13%; ``logistic_wide`` 62%)."""

STEEP_RATIO = 5.0
"""A start whose hypergradient norm (raw units) exceeds this many times the validation loss
its training removed (``U - L``) is steep (:func:`weak_start`): one e-fold change of a
hyperparameter would move the loss by five times all that the training achieved. The suite's
own starts measure 0.01-0.5, ``logistic_wide`` from 100x too large 33, ``char_lm`` from 10x
too large 233."""


def weak_start(record: Any, untrained: Mapping[str, float]) -> str:
    """Why step 0's ``record``, trained but not broken, is a weak start, or ``""``: its
    selection loss (else its validation loss) ``L`` is above ``(1 - WEAK_FRACTION) U``, the
    untrained model's ``U > 0`` (``untrained``: ``{"validation": U, "selection": U_sel}``), so
    its training removed less than :data:`WEAK_FRACTION` of the loss; or its hypergradient norm
    is above :data:`STEEP_RATIO` x ``(U - L)`` on the validation split, so the start sits on a
    steep slope of the loss in its hyperparameters.

    >>> from types import SimpleNamespace as R
    >>> untrained = {"validation": 1.2, "selection": 1.2}
    >>> print(weak_start(R(selection_loss=1.1, val_loss=1.1, grad_norm=0.04), untrained))
    the start trained to selection loss 1.1, 8.3% below the untrained model's 1.2 (less than 20%)
    >>> weak_start(R(selection_loss=0.6, val_loss=0.6, grad_norm=0.04), untrained)
    ''
    >>> print(weak_start(R(selection_loss=0.6, val_loss=0.6, grad_norm=4.0), untrained))
    its hypergradient norm 4 is above 5 x the validation loss its training removed (0.6): steep
    """
    kind, loss = (("selection", record.selection_loss) if record.selection_loss is not None
                  else ("validation", record.val_loss))
    reference = untrained.get(kind)
    if not (_finite(loss) and _finite(reference) and reference > 0):
        return ""
    gained = (reference - loss) / reference
    if gained < WEAK_FRACTION:
        return (f"the start trained to {kind} loss {loss:.3g}, {gained:.1%} below the untrained "
                f"model's {reference:.3g} (less than {WEAK_FRACTION:.0%})")
    norm, value, start = record.grad_norm, record.val_loss, untrained.get("validation")
    if not (_finite(norm) and _finite(value) and _finite(start)):
        return ""
    removed = start - value
    if removed > 0 and norm > STEEP_RATIO * removed:
        return (f"its hypergradient norm {norm:.3g} is above {STEEP_RATIO:g} x the validation "
                f"loss its training removed ({removed:.3g}): steep")
    return ""


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and math.isfinite(value)


def start_order(history: Sequence[Any], first_gradient_step: int, best_step: int,
                ranking: Callable[[Any], float]) -> list[int]:
    """The steps of the global phase (``step < first_gradient_step``) that the gradient phase
    may start from, in the order it tries them: ``best_step`` (the loop's best), then the
    other successful ones by their ``ranking`` loss, the earlier step first on a tie.

    >>> from types import SimpleNamespace as R
    >>> steps = [R(step=0, status="ok", loss=0.5), R(step=1, status="failed", loss=None),
    ...          R(step=2, status="ok", loss=0.2), R(step=3, status="ok", loss=0.4),
    ...          R(step=4, status="ok", loss=0.1)]
    >>> start_order(steps, 4, 2, lambda r: r.loss)
    [2, 3, 0]
    """
    others = [r for r in history if r.step < first_gradient_step and r.status == "ok"
              and r.step != best_step]
    return [best_step, *(r.step for r in sorted(others, key=lambda r: (ranking(r), r.step)))]


def restarts(history: Sequence[Any], first_gradient_step: int) -> list[int]:
    """The failed steps after which the gradient phase started over from another point of the
    global phase: its first steps, as long as all of them failed and a successful step of the
    phase is left untried (:func:`start_order`), so at most the phase's successes less one.

    >>> from types import SimpleNamespace as R
    >>> run = [R(step=0, status="ok"), R(step=1, status="ok"), R(step=2, status="failed"),
    ...        R(step=3, status="ok"), R(step=4, status="failed"), R(step=5, status="failed"),
    ...        R(step=6, status="failed")]
    >>> restarts(run, 4)
    [4, 5]
    """
    left = sum(r.status == "ok" for r in history if r.step < first_gradient_step) - 1
    out: list[int] = []
    for record in history:
        if record.step < first_gradient_step:
            continue
        if record.status != "failed" or len(out) >= left:
            break
        out.append(record.step)
    return out


def check_explore(caller: str, explore: int, decades: float) -> tuple[int, float]:
    """``explore`` as an int >= 0 and ``decades`` as a number in (0, 10], else the standard
    error."""
    count = nonnegative_int(caller, "explore", explore)
    if not (is_number(decades) and 0 < decades <= 10):
        raise fail(caller, "explore_decades", "a number in (0, 10]", decades)
    return count, float(decades)


__all__ = ["CHAOTIC_RATIO", "STEEP_RATIO", "WEAK_FRACTION", "broken_start", "chaotic",
           "check_explore", "explore_points", "explored_names", "restarts", "start_order",
           "weak_start"]
