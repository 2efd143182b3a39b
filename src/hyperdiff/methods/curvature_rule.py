"""What every optimizer's tangent rule of the ``curvature`` window shares: the rule's shape
(:class:`CurvatureRule`) and the squared-gradient decay :data:`RHO`.

:mod:`hyperdiff.methods.curvature` (heavy-ball SGD, the window) and
:mod:`hyperdiff.methods.curvature_adam` (Adam / AdamW) both build on this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.engine.optimizers import resolve
from hyperdiff.engine.problem import Problem
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.typing import Params

RHO = 0.99  # decay of the squared-gradient average (Adam's beta2 for this estimate)


class CurvatureRule(NamedTuple):
    """One optimizer's tangent rule for :func:`~hyperdiff.methods.curvature.curvature_segment`:

    - ``initial(problem, raw, extra=0)``: the zero tangent it carries (``extra`` rows after
      the carried coefficients': the loss-term row);
    - ``values(problem, hview, grads, params, old_state, new_state, step)``: what the rule
      reads from step ``step`` (its gradient, moments, coefficients);
    - ``advance(tangent, values, lr, dlr, mu, scale, count)``: one step of the recurrence, in
      place (``dlr`` None: without the direct term; ``count`` the squared gradients averaged
      after it, a Python int: the bias correction reads no device value);
    - ``direct(values, lr)``: ``-d theta_{t+1} / d lr_t`` (n,), the direct term's vector;
    - ``decay(tangent, values, lr, dwd)``: add a carried weight decay's direct term, ``dwd =
      d wd_t / du`` (R, n) or (R, 1), in place (:func:`carries_decay`);
    - ``average(problem, hview, grads, params, tangent, step)``: the squared-gradient average
      ``v`` alone, in place, as ``advance`` moves it: the step of a tangent with no rows (no
      carried coefficient reads a raw value, as a constant learning rate), where nothing else
      of the rule can be read;
    - ``gradient(tangent, values, lr)``: add to the tangent's last row the direct term of a
      unit change of every entry of the step's train gradient (``dg_t = 1``), in place: the
      loss-term row of :func:`~hyperdiff.methods.curvature.curvature_samples`'s
      ``loss_terms``."""

    initial: Callable[..., Any]
    values: Callable[..., Any]
    advance: Callable[..., None]
    direct: Callable[[Any, Tensor], Tensor]
    decay: Callable[[Any, Any, Tensor, Tensor], None]
    average: Callable[..., None]
    gradient: Callable[[Any, Any, Tensor], None]


def average_squares(v: Tensor, g: Tensor) -> None:
    """``v <- RHO v + (1 - RHO) g^2`` in place: the curvature estimate's squared-gradient
    average (each rule's ``advance`` and ``average``)."""
    v.mul_(RHO).addcmul_(g, g, value=1.0 - RHO)


def keeps_all(mu: float | Tensor) -> bool:
    """Whether the forgetting factor ``mu`` keeps the whole past (exactly 1.0)."""
    return isinstance(mu, float) and mu == 1.0


DECAY_CARRIED = ("adamw", "sgd")
"""The optimizers whose weight decay's tangent is carried: AdamW's decoupled decay and
heavy-ball SGD's coupled one (Adam's coupled decay, inside both moments, keeps its one-step
effect)."""


def carries_decay(problem: Problem) -> bool:
    """Whether the optimizer's ``weight_decay`` is carried: :data:`DECAY_CARRIED`'s optimizers
    when a schedule or a (not ``per_element``) hyperparameter sets it (a number has no
    derivative; a ``per_element`` or callable one keeps its one-step signal)."""
    wd = problem.optimizer.coefficients.get("weight_decay")
    return problem.optimizer.name in DECAY_CARRIED and (
        isinstance(wd, Schedule)
        or (isinstance(wd, str) and problem.hparams[wd].kind != "per_element"))


def carried_coefficients(problem: Problem) -> list[Any]:
    """The optimizer coefficients whose tangents are carried: ``lr``, and the weight decay
    where :func:`carries_decay`."""
    coefs = problem.optimizer.coefficients
    return [coefs["lr"], coefs["weight_decay"]] if carries_decay(problem) else [coefs["lr"]]


def per_entry(coef: Any, hview: Any, step: int, params: Params, like: Tensor
              ) -> Tensor | float:
    """A coefficient's value at ``step`` for every parameter entry: a float when it is a
    number, a (1,) tensor when every parameter tensor reads the same one-entry value (the
    same tensor: a scalar or per_step hyperparameter), else an (n,) tensor (detached: a
    constant of the tangent rule).

    The (1,) tensor broadcasts to the (n,) one's entries in every elementwise use, with the
    same arithmetic per entry (the same bits), without building an (n,) copy at every step
    (``tests/test_online_oncost2.py``)."""
    if isinstance(coef, (int, float)):
        return float(coef)
    values = [resolve(coef, hview, step, k) for k in params]
    first = values[0]
    if isinstance(first, Tensor) and first.numel() == 1 and all(v is first for v in values):
        return first.detach().to(dtype=like.dtype, device=like.device).reshape(1)
    return torch.cat([
        torch.as_tensor(v, dtype=like.dtype, device=like.device)
        .detach().expand(p.shape).reshape(-1) for v, p in zip(values, params.values(),
                                                              strict=True)])


def carried_rows(problem: Problem, *, decay: bool = True) -> Tensor | None:
    """Indices of the flat raw values (``problem.hparams.flatten`` order) that the carried
    coefficients read, or None for all of them (a callable coefficient may read any);
    ``decay=False``: the learning rate's only.

    The tangent ``Z_t = d theta_t / du`` starts at 0 and its recurrence is driven only by the
    carried coefficients' derivatives ``d lr_t / du`` (and ``d wd_t / du``): a row ``u_j`` that
    none of them reads stays exactly 0 for the whole run, so the tangents are kept for these
    rows only (``R x n`` instead of ``P x n``; 1 of 501 rows with a learning rate and 500
    per-feature penalties)."""
    hp = problem.hparams
    names = carried_names(problem, decay=decay)
    if names is None:
        return None
    index = hp.unflatten(torch.arange(hp.numel, device=problem.device))
    rows = [index[n].reshape(-1) for n in names]
    if sum(len(r) for r in rows) == hp.numel:
        return None
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64,
                                                     device=problem.device)


def carried_names(problem: Problem, *, decay: bool = True) -> list[str] | None:
    """The hyperparameters whose raw values :func:`carried_rows` keeps, in
    ``problem.hparams`` order (their entries in that order are the rows), or None for all of
    them (a callable coefficient may read any)."""
    names: set[str] = set()
    for coef in carried_coefficients(problem) if decay else [problem.optimizer.coefficients["lr"]]:
        if isinstance(coef, Schedule):
            names.update(coef.names.values())
        elif isinstance(coef, str):
            names.add(coef)
        elif callable(coef):
            return None
    return [n for n in problem.hparams if n in names]


def tangent_rows(problem: Problem) -> int:
    """The rows of the carried tangents: ``len(carried_rows(problem))``, or every raw value."""
    rows = carried_rows(problem)
    return problem.hparams.numel if rows is None else len(rows)


def saved_tangent_rows(problem: Problem, saved: Any) -> Any:
    """A saved tangent (the checkpoint's list of tensors) in today's layout, from two older
    ones. A checkpoint written before :func:`carried_rows` holds every raw value's row (``(P,
    n)`` tensors); where the rows not carried are exactly 0 there (the recurrence never drives
    them) they are dropped. One written before SGD's coupled weight decay was carried
    (:data:`DECAY_CARRIED`) holds the learning rate's rows only: the decay's rows are added as
    zeros, so its tangent starts at the resume. Anything else is returned unchanged, for the
    checkpoint's shape check to refuse."""
    rows = carried_rows(problem)
    numel = problem.hparams.numel
    if not isinstance(saved, list):
        return saved
    lr_rows = carried_rows(problem, decay=False)
    every = torch.arange(numel, device=problem.device)
    today = every if rows is None else rows
    before = every if lr_rows is None else lr_rows
    out = []
    for tensor in saved:
        if isinstance(tensor, Tensor) and tensor.dim() == 2:
            if tensor.shape[0] == numel and rows is not None:
                tensor = _kept_rows(tensor, rows)
                if tensor is None:
                    return saved
            elif tensor.shape[0] == len(before) < len(today):
                tensor = _with_zero_rows(tensor, before, today)
        out.append(tensor)
    return out


def _kept_rows(tensor: Tensor, rows: Tensor) -> Tensor | None:
    """``tensor``'s ``rows``, or None where a row not among them is not 0."""
    index = rows.to(tensor.device)
    dropped = torch.ones(tensor.shape[0], dtype=torch.bool, device=tensor.device)
    dropped[index] = False
    return None if bool(tensor[dropped].any()) else tensor[index]


def _with_zero_rows(tensor: Tensor, before: Tensor, today: Tensor) -> Tensor:
    """``tensor``'s rows (raw values ``before``) placed among the rows ``today`` (a superset,
    both ascending), the others 0."""
    out = tensor.new_zeros((len(today), tensor.shape[1]))
    out[torch.searchsorted(today.to(tensor.device), before.to(tensor.device))] = tensor
    return out


__all__ = ["DECAY_CARRIED", "RHO", "CurvatureRule", "average_squares", "carried_coefficients",
           "carried_names", "carried_rows", "carries_decay", "keeps_all", "per_entry",
           "saved_tangent_rows", "tangent_rows"]
