"""The ``curvature`` window's tangent rule for Adam and AdamW (``hd.adam``, ``hd.adamw``).

Adam's step ``t`` (``k = t + 1``), as :func:`hyperdiff.engine.optimizers.adam` and torch.optim::

    s_t = g_t + wd p_t   (coupled, hd.adam)      s_t = g_t  (AdamW)
    m'  = b1 m + (1 - b1) s_t,   v' = b2 v + (1 - b2) s_t^2,   c1 = 1 - b1^k, c2 = 1 - b2^k
    r   = m' / (sqrt(v') / sqrt(c2) + eps)
    p'  = p - (lr_t / c1) r      (AdamW: p' = (1 - lr_t wd) p - (lr_t / c1) r)

differentiated forward in the learning rate's raw values ``u`` with the tangents ``Z = dp/du``,
``Zm = dm/du``, ``Zv = dv/du`` (shape ``(P, n)``) and the train gradient's tangent modelled as
``dg = D_t * Z`` (the diagonal curvature of :mod:`hyperdiff.methods.curvature`; the coupled decay's
``wd Z`` exactly)::

    ds   = (D_t + wd) * Z                       (AdamW: D_t * Z)
    Zm'  = b1 Zm + (1 - b1) ds,   Zv' = b2 Zv + (1 - b2) 2 s_t ds
    dq   = Zv' / (2 sqrt(v') sqrt(c2))          (0 where v' = 0, as optimizers.safe_sqrt)
    Z'   = mu [(1 - lr_t wd) Z - (lr_t / c1) (Zm' - r dq) / q] - (d lr_t / du) (r / c1 + wd p)
    q    = sqrt(v') / sqrt(c2) + eps, the factors ``(1 - lr_t wd)`` and ``wd p`` AdamW's only

and ``Zm'``, ``Zv'`` also multiplied by ``mu = 1 - 1 / horizon``: the whole state's tangent
forgets, so ``Z_t = sum_s mu^(t-1-s) J_(t<-s) dPhi_s/du``. AdamW's decoupled weight decay, where
a hyperparameter sets it, adds its direct term ``-(d wd_t / du) lr_t p`` (:func:`adamw_decay`);
the other coefficients (betas, eps, Adam's coupled decay) are constants here: their one-step
effect comes from the exact last step.

``D_t = min(scale * vhat_t, 2 (1 + b1) / ((1 - b1) a_t))`` with ``vhat`` the bias-corrected
average (decay :data:`~hyperdiff.methods.curvature_rule.RHO`) of the squared train gradient
``g_t^2``
(without the decay) and ``a_t = lr_t / (c1 q)`` Adam's effective step per coordinate: with the
denominator frozen, Adam's step is heavy-ball with learning rate ``(1 - b1) a_t`` and momentum
``b1``, whose stability limit on a curvature is that cap (``2 / a_t`` for ``b1 = 0``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.engine.optimizers import AdamState, safe_sqrt
from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import flat
from hyperdiff.methods.curvature_rule import (
    RHO,
    CurvatureRule,
    average_squares,
    keeps_all,
    per_entry,
    tangent_rows,
)
from hyperdiff.typing import Params

ADAM_NAMES = ("adam", "adamw")


class AdamCurvatureTangent(NamedTuple):
    """The carried state over the ``n`` parameter entries (``problem.params`` order): ``z``,
    ``zm``, ``zv`` the tangents of the parameters and of Adam's two moments, shape ``(R, n)``;
    ``v`` (n,) the squared-gradient average of the curvature estimate; ``steps`` (0-d)."""

    z: Tensor
    zm: Tensor
    zv: Tensor
    v: Tensor
    steps: Tensor


class AdamStep(NamedTuple):
    """One Adam step's values, flat (n,): the train gradient ``g``, the gradient Adam saw
    ``s`` (``g + wd p`` when coupled), the parameters ``p`` before it, the new moments ``m``,
    ``v``; coefficients as floats or (n,) tensors; ``k`` the bias-correction count."""

    g: Tensor
    s: Tensor
    p: Tensor
    m: Tensor
    v: Tensor
    b1: Tensor | float
    b2: Tensor | float
    eps: Tensor | float
    wd: Tensor | float
    decoupled: bool
    k: int


def initial_adam_tangent(problem: Problem, raw: dict[str, Tensor], extra: int = 0
                         ) -> AdamCurvatureTangent:
    """Zero tangents and curvature statistics for the start of the run; ``extra`` rows after
    the carried coefficients' (the loss-term row)."""
    size = tangent_rows(problem) + extra  # the rows the carried coefficients read
    like = flat(problem.params.values())
    z = like.new_zeros((size, like.numel()))
    return AdamCurvatureTangent(z, torch.zeros_like(z), torch.zeros_like(z),
                                torch.zeros_like(like), like.new_zeros((), dtype=torch.int64))


def adam_step(problem: Problem, hview: Any, grads: Params, params: Params, new_state: AdamState,
              step: int) -> AdamStep:
    """The values of Adam's step at ``step`` the tangent rule needs (the new moments read from
    the optimizer's own new state)."""
    coefs = problem.optimizer.coefficients
    g = flat(grads.values())
    p = flat(params.values()).to(g.dtype)
    wd = per_entry(coefs["weight_decay"], hview, step, params, g)
    decoupled = problem.optimizer.name == "adamw"
    s = g if decoupled or _no_decay(wd) else g + wd * p
    return AdamStep(
        g, s, p, flat(new_state.exp_avg.values()).to(g.dtype),
        flat(new_state.exp_avg_sq.values()).to(g.dtype),
        per_entry(coefs["beta1"], hview, step, params, g),
        per_entry(coefs["beta2"], hview, step, params, g),
        per_entry(coefs["eps"], hview, step, params, g), wd, decoupled, step + 1)


def _no_decay(wd: Tensor | float) -> bool:
    return isinstance(wd, float) and wd == 0


def lr_direction(values: AdamStep, lr: Tensor) -> Tensor:
    """``-d p' / d lr_t`` (n,): ``r / c1``, plus ``wd p`` for AdamW."""
    denom = safe_sqrt(values.v) / (1 - values.b2 ** values.k) ** 0.5 + values.eps
    out = values.m / denom / (1 - values.b1 ** values.k)
    if values.decoupled and not _no_decay(values.wd):
        out = out + values.wd * values.p
    return out


class _Factors(NamedTuple):
    """What Adam's tangent reads at one step, the same for every row, each computed once:
    ``c1 = 1 - b1^k``, ``sqrt(c2)``, ``q = sqrt(v') / sqrt(c2) + eps``, ``r = m' / q`` and
    ``1 / (2 sqrt(v'))`` (0 where ``v' = 0``, as optimizers.safe_sqrt)."""

    c1: Tensor | float
    c2_sqrt: Tensor | float
    denom: Tensor
    ratio: Tensor
    half_inverse: Tensor


def _factors(values: AdamStep) -> _Factors:
    """:class:`_Factors` of the step ``values`` (for :func:`advance_adam` and
    :func:`adam_gradient`)."""
    _, _, _, m, v, b1, b2, eps, _, _, k = values
    c2_sqrt = (1 - b2 ** k) ** 0.5
    root = torch.sqrt(v)  # v >= 0; no derivative is taken here
    denom = root / c2_sqrt + eps
    return _Factors(1 - b1 ** k, c2_sqrt, denom, m / denom,
                    (0.5 / root).masked_fill_(v <= 0, 0.0))


def advance_adam(tangent: AdamCurvatureTangent, values: AdamStep, lr: Tensor,
                 dlr: Tensor | None, mu: float | Tensor, scale: float, count: int) -> None:
    """One step of the module doc's recurrence, in place. ``lr`` (n,) or (1,); ``dlr`` (R, n)
    or (R, 1), or None (no direct term); ``count`` the squared gradients in the curvature
    estimate after this step.

    The ``(R, n)`` tangents take 11 in-place operations and one temporary: every factor that
    is the same for all rows (``(1 - b1) D``, ``(1 - b2) 2 s D``, ``r / (2 sqrt(v') sqrt(c2))``,
    ``lr / (c1 q)``) is an ``(n,)`` vector, computed once."""
    z, zm, zv, v_est, _ = tangent
    g, s, _, _, _, b1, b2, _, wd, decoupled, _ = values
    average_squares(v_est, g)
    curvature = v_est * (scale / (1.0 - RHO ** count))
    c1, c2_sqrt, denom, ratio, half_inverse = _factors(values)
    step_size = lr / c1
    cap = (2 * (1 + b1) / (1 - b1)) * denom / step_size.clamp(min=1e-30)
    curvature = torch.minimum(curvature, cap)
    if not decoupled and not _no_decay(wd):
        curvature = curvature + wd
    # Zm' = b1 Zm + (1 - b1) D Z and Zv' = b2 Zv + (1 - b2) 2 s D Z (the old Z on the right)
    zm.mul_(b1).addcmul_(z, curvature * (1 - b1))
    zv.mul_(b2).addcmul_(z, curvature * ((1 - b2) * 2) * s)
    # Z' = Z - (lr / c1) (Zm' - Zv' r / (2 sqrt(v') sqrt(c2))) / q
    change = zv * (half_inverse / c2_sqrt * ratio)
    change.sub_(zm)
    if decoupled and not _no_decay(wd):
        z.mul_(1 - lr * wd)
    z.addcmul_(change, step_size / denom)
    if not keeps_all(mu):
        for t in (z, zm, zv):
            t.mul_(mu)
    if dlr is not None:
        direction = ratio / c1
        if decoupled and not _no_decay(wd):
            direction = direction + wd * values.p
        z.addcmul_(dlr, direction, value=-1.0)


def _adam_values(problem: Problem, hview: Any, grads: Params, params: Params, old_state: Any,
                 new_state: AdamState, step: int) -> AdamStep:
    return adam_step(problem, hview, grads, params, new_state, step)


def adamw_decay(tangent: AdamCurvatureTangent, values: AdamStep, lr: Tensor, dwd: Tensor
                ) -> None:
    """AdamW's decoupled decay ``p' = (1 - lr_t wd_t) p - ...``: ``Z -= (d wd_t / du) lr_t p``
    (in place)."""
    tangent.z.addcmul_(dwd, lr * values.p, value=-1.0)


def adam_gradient(tangent: AdamCurvatureTangent, values: AdamStep, lr: Tensor) -> None:
    """The direct term of a unit change of the gradient Adam sees (``ds_t = 1`` in every
    entry) on the tangent's last row, in place: ``Zm += (1 - b1)``, ``Zv += (1 - b2) 2 s_t``
    and ``Z`` the module doc's ``-(lr_t / c1) (dm - r dq) / q`` of these two."""
    c1, c2_sqrt, denom, ratio, half_inverse = _factors(values)
    b1, b2, s = values.b1, values.b2, values.s
    dm, dv = 1 - b1, ((1 - b2) * 2) * s
    tangent.zm[-1].add_(dm)
    tangent.zv[-1].add_(dv)
    change = dv * (half_inverse / c2_sqrt * ratio) - dm
    tangent.z[-1].add_(change * ((lr / c1) / denom))


def adam_average(problem: Problem, hview: Any, grads: Params, params: Params,
                 tangent: AdamCurvatureTangent, step: int) -> None:
    """The curvature estimate's average of the squared train gradient ``g_t^2`` (without the
    decay), in place: :func:`advance_adam`'s first line, for a tangent with no rows."""
    average_squares(tangent.v, flat(grads.values()))


ADAM_RULE = CurvatureRule(initial_adam_tangent, _adam_values, advance_adam, lr_direction,
                          adamw_decay, adam_average, adam_gradient)
"""Adam's and AdamW's rule for :func:`~hyperdiff.methods.curvature.curvature_segment`."""


__all__ = ["ADAM_NAMES", "ADAM_RULE", "AdamCurvatureTangent", "AdamStep", "adam_average",
           "adam_gradient", "adam_step", "adamw_decay", "advance_adam", "initial_adam_tangent",
           "lr_direction"]
