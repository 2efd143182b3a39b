"""Long-horizon hypergradient tangents under a diagonal curvature model: windows and offline.

Real-time forward mode (RTHO, :func:`~hyperdiff.methods.forward.forward_segment`) carries the
exact tangents ``Z_t = d theta_t / d lam`` through every step, at the price of Jacobian-vector
products with all hyperparameters at every step (7-10x one plain training in
``benchmarks/horizon.py``); the greedy windows (``reverse``, K steps back) are cheap but see the
effect of the learning rate only a few steps later, where a larger one mostly adds noise (the
short-horizon bias). This method keeps RTHO's horizon at the cost of elementwise operations:
for heavy-ball SGD (``hd.sgd``: ``b_{t+1} = beta b_t + d_t``, ``theta_{t+1} = theta_t -
lr_t b_{t+1}``, with ``d_t`` the gradient plus the optimizer's weight decay) it propagates the
learning rate's tangents with the Hessian replaced by a diagonal estimate ``D_t``::

    Zb_{t+1} = beta Zb_t + (D_t + wd_t) * Z_t              (momentum tangent; Zb_1 = D_0 Z_0)
    Z_{t+1}  = mu (Z_t - lr_t Zb_{t+1}) - (d lr_t / du) b_{t+1}
    D_t      = min(scale * vhat_t, 2 (1 + beta) / lr_t),   v_t = rho v_{t-1} + (1 - rho) d_t^2

``vhat`` is ``v`` bias-corrected (as Adam's second moment), ``scale`` the training batch's rows
(``B * E[g_B^2]`` estimates the diagonal of the empirical Fisher, a Gauss-Newton model of the
Hessian, where the minibatch gradient is mostly sampling noise), and the cap keeps the
recurrence inside heavy-ball's stability region. A fixed batch (every step trains on the same
rows, e.g. a full batch) has no sampling noise: ``B g^2`` is then ``B`` times the squared
gradient, not a per-example second moment, and the scale is 1 (the squared gradient itself,
the lower bound ``(E_i g_i)^2 <= E_i g_i^2`` of that moment; :func:`batch_scale`). ``mu = 1 -
1 / horizon`` forgets what the hyperparameters did ``horizon`` steps ago: the tangent is the
derivative for hyperparameters held fixed over the past, which they are not during tuning.
With a zero Hessian (a loss linear in ``theta``) and ``scale = 0``, ``mu = 1``, the recurrence is
exact and the method equals RTHO (``tests/test_online_curvature.py``). Adam and AdamW get the
same model through their moments' tangents: :mod:`hyperdiff.methods.curvature_adam`.

At the end of the window the last step is differentiated exactly (reverse mode through it,
with the state before it constant, as ``reverse`` with ``backprop=1``): that gives every
hyperparameter its direct one-step effect (the loss's, such as a weight decay, included); the
carried tangents add the earlier steps' effect through the learning rate::

    dL/du = [reverse through step t1-1] + <grad_theta L_val(theta_{t1}), Zt_{t1}>

with ``Zt_{t1}`` the tangent propagated through the last step without its direct term. The
optimizer's ``lr`` coefficient is carried (its derivative in every raw value, exactly, by
autograd once per window), and a weight decay when a hyperparameter sets it: AdamW's decoupled
one (direct term ``-(d wd_t / du) lr_t p_t``) and SGD's coupled one (``Zb`` gains ``(d wd_t / du)
p_t``; :func:`decay_derivatives`), so a weight decay gets the same long-horizon signal as the
learning rate; other coefficients (Adam's coupled decay, momentum, betas) get their one-step
effect only. SGD's coupled decay's ``wd_t Z_t`` (its exact Hessian term) is added to the model
``D_t``. Buffers (BatchNorm statistics) are constants.

Offline (``method(problem)``, :func:`curvature_offline`) is the segment ``[0, T)`` from theta_0
with no carry, at the problem's validation data: one training carrying the tangents plus a
backward pass through its last step, about 1.2-1.4x a plain training (docs/long_horizon.md)
where reverse mode through all T steps costs 2-4x. Over one fixed training nothing needs
forgetting: the default ``horizon="auto"`` keeps the whole run offline (``mu = 1``) and forgets
over 500 steps online; a horizon given explicitly applies to both. It is approximate (the
curvature model) and exact where the model is: a loss linear in theta with ``curvature_scale=0``
and no forgetting gives reverse mode's hypergradient (``tests/test_offline_curvature.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.engine.data.evaluation import batch_rows
from hyperdiff.engine.optimizers import _add_scaled, _is_zero, resolve
from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import (
    TrainState,
    check_finite_losses,
    flat,
    initial_state,
    train_gradient,
    validation_loss,
    zeros_for_unused,
)
from hyperdiff.errors import HyperdiffError, fail, is_number, positive_float, positive_int
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.methods.base import Capabilities, HyperGradient, Method, Segment, finish
from hyperdiff.methods.curvature_adam import ADAM_NAMES, ADAM_RULE
from hyperdiff.methods.curvature_rule import (
    RHO,
    CurvatureRule,
    average_squares,
    carried_names,
    carried_rows,
    carries_decay,
    keeps_all,
    per_entry,
    saved_tangent_rows,
    tangent_rows,
)
from hyperdiff.methods.segments import (
    at_val_batches,
    detach_tree,
    detached_state,
    sample_grads,
)
from hyperdiff.typing import Batch, Params


class CurvatureTangent(NamedTuple):
    """The carried state, over the ``n`` parameter entries flattened in ``problem.params``
    order: ``z`` and ``zb`` the tangents of the parameters and of the momentum, shape ``(R,
    n)`` for the ``R`` raw values that the carried coefficients read
    (:func:`~hyperdiff.methods.curvature_rule.carried_rows`; the others' rows are 0); ``v``
    (n,) the squared-gradient average; ``steps`` the steps averaged (a 0-d tensor)."""

    z: Tensor
    zb: Tensor
    v: Tensor
    steps: Tensor


def rule_for(problem: Problem) -> CurvatureRule:
    """The tangent rule of ``problem``'s optimizer (heavy-ball SGD, Adam / AdamW)."""
    return ADAM_RULE if problem.optimizer.name in ADAM_NAMES else SGD_RULE


def initial_tangent(problem: Problem, raw: dict[str, Tensor], loss_terms: str = "last"
                    ) -> Any:
    """Zero tangents and curvature statistics for the start of the run (an
    :class:`~hyperdiff.methods.curvature_adam.AdamCurvatureTangent` for Adam / AdamW), with
    the loss-term row where ``loss_terms`` carries one (:func:`loss_term_rows`)."""
    return rule_for(problem).initial(problem, raw, loss_term_rows(loss_terms))


def _initial_sgd(problem: Problem, raw: dict[str, Tensor], extra: int = 0) -> CurvatureTangent:
    size = tangent_rows(problem) + extra
    like = flat(problem.params.values())
    z = like.new_zeros((size, like.numel()))
    return CurvatureTangent(z, torch.zeros_like(z), torch.zeros_like(like),
                            like.new_zeros((), dtype=torch.int64))


def check_optimizer(problem: Problem, *, caller: str = "curvature",
                    what: str = "the method", instead: str = "method 'reverse'") -> None:
    """Refuse optimizers whose update this method's tangent rule does not describe
    (``caller``, ``what``, ``instead``: how the messages name the method, the part of it that
    carries the tangents, and the alternative; ``truncated``'s curvature head names itself)."""
    opt = problem.optimizer
    adam = opt.name in ADAM_NAMES
    if not adam and (opt.name != "sgd" or opt.settings.get("nesterov")
                     or opt.settings.get("dampening")):
        raise HyperdiffError(
            f"{caller}: {what} carries the tangents of heavy-ball SGD (hd.sgd "
            "without nesterov or dampening), hd.adam and hd.adamw; got "
            f"{opt.name} with settings {dict(opt.settings)}: use {instead} or "
            "'forward' for it")
    lr = opt.coefficients["lr"]
    if isinstance(lr, str) and problem.hparams[lr].kind == "per_element":
        raise HyperdiffError(
            f"{caller}: {what} needs one learning rate per step and parameter "
            f"tensor (a number, a schedule, a scalar, per_step or per_tensor hyperparameter); "
            f"got the per_element hyperparameter {lr!r}: use {instead} for it")
    dtypes = {p.dtype for p in problem.params.values()}
    if len(dtypes) > 1:
        raise HyperdiffError(f"{caller}: {what} needs parameters of one dtype "
                             f"(got {sorted(map(str, dtypes))})")


JACOBIAN_ROWS = 256
"""The most coefficient values one batched backward pass of :func:`lr_derivatives`
differentiates (its grad outputs, the identity, are this many rows squared at most): a longer
window (offline: ``T`` steps) is differentiated in chunks of steps, each from its own
evaluation of the coefficient."""


def lr_derivatives(problem: Problem, raw: dict[str, Tensor], start: int, stop: int,
                   name: str = "lr", *, carried: bool = False) -> tuple[Tensor, Tensor]:
    """``lr_t`` and ``d lr_t / du`` at the window's steps, per parameter tensor: shapes ``(K,
    m)`` and ``(K, P, m)``, with ``u`` the ``P`` flat raw values (``carried``: the ``R``
    rows of :func:`~hyperdiff.methods.curvature_rule.carried_rows` only, the tangent's rows)
    and ``m`` 1 when the learning rate is the same for every parameter tensor (broadcast over
    the entries), else one column per parameter tensor (:class:`WindowValues` repeats a
    step's column over the tensor's entries). A schedule is evaluated for up to
    :data:`JACOBIAN_ROWS` steps in one pass. ``name``: another of the optimizer's coefficients
    instead (AdamW's ``"weight_decay"``: :func:`decay_derivatives`).

    Only the raw values differentiated are leaves, and the derivatives stay per tensor: the
    memory is ``K m R`` numbers, not the ``K P n`` of one row per parameter entry (``n``);
    the numbers are the same (the backward pass from the flat vector of all raw values only
    copied the gradient into it, and repeating a column only copies it)."""
    hp = problem.hparams
    coef = problem.optimizer.coefficients[name]
    rows = carried_rows(problem) if carried else None
    if isinstance(coef, str) and _one_value(problem, coef):  # the same lr_t at every step
        return _repeated_row(problem, raw, coef, start, stop - start, rows)
    if isinstance(coef, (int, float)):  # a number: no raw value moves it
        lrs = torch.full((stop - start, 1), float(coef), dtype=problem.hparam_dtype,
                         device=problem.device)
        return lrs, lrs.new_zeros((stop - start, hp.numel if rows is None else len(rows), 1))
    names = list(hp) if rows is None else (carried_names(problem) or [])
    values = problem.raw_tensors(raw)
    leaves = [values[n].detach().requires_grad_() for n in names]
    values.update(zip(names, leaves, strict=True))
    like = torch.empty((), dtype=problem.hparam_dtype, device=problem.device)
    per_tensor = not isinstance(coef, Schedule) and not _same_for_every_tensor(problem, coef)
    chunk = max(1, JACOBIAN_ROWS // (len(problem.params) if per_tensor else 1))
    lrs_parts, jac_parts = [], []
    for begin in range(start, stop, chunk):
        end = min(stop, begin + chunk)
        with torch.enable_grad():
            window = _window_rows(problem, coef, hp.view(values), begin, end, per_tensor, like)
            jac = _jacobian(window.reshape(-1), leaves, like)                # (k m, R)
        lrs_parts.append(window.detach())
        jac_parts.append(jac.reshape(*window.shape, -1))
    lrs = torch.cat(lrs_parts) if len(lrs_parts) > 1 else lrs_parts[0]
    jac = torch.cat(jac_parts) if len(jac_parts) > 1 else jac_parts[0]
    return lrs, jac.transpose(1, 2)


def _window_rows(problem: Problem, coef: Any, hview: Any, start: int, stop: int,
                 per_tensor: bool, like: Tensor) -> Tensor:
    """The coefficient ``coef`` at steps ``start .. stop-1``: ``(k, 1)``, or ``(k, tensors)``
    (``per_tensor``), with its graph to the raw values of ``hview``."""
    if isinstance(coef, Schedule):
        return coef.window(hview, start, stop)[:, None]
    if not per_tensor:
        key = next(iter(problem.params))
        return torch.stack([_as_tensor(resolve(coef, hview, t, key), like)
                            for t in range(start, stop)])[:, None]
    return torch.stack([torch.stack([_as_tensor(resolve(coef, hview, t, k), like)
                                     for k in problem.params])
                        for t in range(start, stop)])


def _jacobian(outputs: Tensor, leaves: list[Tensor], like: Tensor) -> Tensor:
    """``d outputs / d leaves``, ``(len(outputs), R)`` with ``R`` the leaves' entries
    (flattened, in order), by one batched backward pass over the rows of the identity (0 for
    a leaf that no output reads)."""
    count = outputs.numel()
    if not outputs.requires_grad or not leaves:  # a learning rate that no hyperparameter moves
        return like.new_zeros((count, sum(leaf.numel() for leaf in leaves)))
    eye = torch.eye(count, dtype=outputs.dtype, device=outputs.device)
    found = torch.autograd.grad(outputs, leaves, eye, is_grads_batched=True, allow_unused=True)
    return torch.cat([(g if g is not None else leaf.new_zeros((count, *leaf.shape)))
                      .reshape(count, -1) for g, leaf in zip(found, leaves, strict=True)], dim=1)


class WindowValues:
    """A window's coefficient values or derivatives kept per parameter tensor (as
    :func:`lr_derivatives` gives them): ``values`` ``(K, ..., m)``, ``m`` 1 or one column per
    parameter tensor of ``sizes`` entries. ``window[i]`` is step ``i``'s over the ``n``
    parameter entries: ``(..., 1)`` (broadcast) or ``(..., n)``, each tensor's column repeated
    over its entries. One step at a time, so a window holds ``K m R`` numbers, not ``K n R``
    (K times the tangent, T times offline)."""

    def __init__(self, values: Tensor, sizes: list[int]) -> None:
        self.values = values
        self.sizes = sizes
        self.counts = torch.tensor(sizes, device=values.device)
        self.entries = sum(sizes)

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, step: int) -> Tensor:
        value = self.values[step]
        if value.shape[-1] == 1:
            return value
        return torch.repeat_interleave(value, self.counts, dim=-1, output_size=self.entries)

    def with_zero_row(self) -> WindowValues:
        """The derivatives ``(K, R, m)`` with a row of zeros after the ``R``."""
        return WindowValues(_with_zero_row(self.values), self.sizes)


def decay_derivatives(problem: Problem, raw: dict[str, Tensor], start: int, stop: int
                      ) -> Tensor | None:
    """``d wd_t / du`` (as :func:`lr_derivatives`, in the tangent's rows) of a carried weight
    decay (:func:`~hyperdiff.methods.curvature_rule.carries_decay`: AdamW's decoupled one,
    SGD's coupled one), else None. AdamW's step ``p' = (1 - lr_t wd_t) p - ...`` gives the
    tangent the direct term ``-(d wd_t / du) lr_t p``; SGD's ``b' = beta b + g + wd_t p``
    gives the momentum's tangent ``(d wd_t / du) p``: both carried like the learning rate's."""
    if not carries_decay(problem):
        return None
    return lr_derivatives(problem, raw, start, stop, "weight_decay", carried=True)[1]


def _one_value(problem: Problem, coef: Any) -> bool:
    """Whether ``coef`` is a scalar hyperparameter's name: one value for every step and
    parameter tensor."""
    return isinstance(coef, str) and problem.hparams[coef].kind == "scalar"


def _repeated_row(problem: Problem, raw: dict[str, Tensor], coef: str, start: int,
                  steps: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`lr_derivatives` of the scalar hyperparameter ``coef``, the same value at each of
    ``steps`` steps: ``(K, 1)`` and ``(K, P, 1)``. Its ``K`` rows are one row repeated, so one
    backward pass gives them (the batched pass over ``K`` equal rows gave each the same
    numbers, at several times the cost on a small problem), and that pass starts at ``coef``'s
    own raw value: its derivative is 0 in every other raw value, placed at ``coef``'s offset
    in the flat order (the same numbers as the pass from the flat vector of all ``P`` values,
    whose split only copies the gradient: ``tests/test_online_oncost2.py``). ``rows``: the
    flat raw values to keep (None: all ``P``)."""
    hp = problem.hparams
    values = problem.raw_tensors(raw)
    leaf = values[coef].detach().requires_grad_()
    values[coef] = leaf
    grad = None
    with torch.enable_grad():
        value = _as_tensor(resolve(coef, hp.view(values), start, next(iter(problem.params))),
                           leaf)
        if value.requires_grad:
            grad = torch.autograd.grad(value, leaf, allow_unused=True)[0]
    jac = hp.flatten({n: grad if n == coef and grad is not None else
                      torch.zeros_like(v, dtype=leaf.dtype) for n, v in values.items()})
    if rows is not None:
        jac = jac[rows.to(jac.device)]
    lrs = value.detach().reshape(1, 1).repeat(steps, 1)
    return lrs, jac.reshape(1, -1, 1).repeat(steps, 1, 1)


def _same_for_every_tensor(problem: Problem, coef: Any) -> bool:
    if not isinstance(coef, str):
        return not callable(coef)
    return problem.hparams[coef].kind != "per_tensor"


def _as_tensor(value: Tensor | float, like: Tensor) -> Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.numel() != 1:
        raise HyperdiffError(f"curvature: the method needs one learning rate per step "
                             f"and parameter tensor; the lr coefficient gave a tensor of shape "
                             f"{tuple(value.shape)}: use method 'reverse' for it")
    return value.reshape(())


class HeavyBallStep(NamedTuple):
    """One :func:`hd.sgd` step's values, flat (n,): ``d`` the gradient plus the coupled
    weight decay ``wd p``, ``b`` the new momentum ``b_{t+1}``, ``p`` the parameters before the
    step (without a weight decay, which alone reads it: ``d``); ``beta`` and ``wd`` floats or
    tensors ((n,) for ``wd``)."""

    d: Tensor
    b: Tensor
    beta: Tensor | float
    p: Tensor
    wd: Tensor | float


def _heavy_ball(problem: Problem, hview: Any, grads: Params, opt_state: Any, params: Params,
                step: int) -> HeavyBallStep:
    """``d_t`` (the gradient plus the optimizer's weight decay), ``b_{t+1}``, ``beta``, ``p_t``
    and ``wd_t`` of :func:`hd.sgd`'s step at ``step``, flat."""
    coefs = problem.optimizer.coefficients
    direction, p, wd = _sgd_direction(problem, hview, grads, params, step)
    if not opt_state.momentum:
        return HeavyBallStep(direction, direction, 0.0, p, wd)
    # every entry's own momentum (a per-tensor one was read from the first tensor alone)
    beta = per_entry(coefs["momentum"], hview, step, params, direction)
    if step == 0:  # torch.optim.SGD: b_1 = d_0
        return HeavyBallStep(direction, direction, beta, p, wd)
    return HeavyBallStep(direction, _add_scaled(direction, flat(opt_state.momentum.values()),
                                                beta), beta, p, wd)


def _sgd_direction(problem: Problem, hview: Any, grads: Params, params: Params, step: int
                   ) -> tuple[Tensor, Tensor, Tensor | float]:
    """``d_t = g_t + wd_t p_t``, ``p_t`` and ``wd_t`` of :func:`hd.sgd`'s step at ``step``,
    flat (``p_t`` is ``d_t`` itself without a weight decay, which alone reads it)."""
    direction = flat(grads.values())
    coef = problem.optimizer.coefficients["weight_decay"]
    if _is_zero(coef):
        return direction, direction, 0.0
    wd = per_entry(coef, hview, step, params, direction)
    p = flat(params.values()).to(direction.dtype)
    return direction + wd * p, p, wd


def _sgd_average(problem: Problem, hview: Any, grads: Params, params: Params,
                 tangent: CurvatureTangent, step: int) -> None:
    """The curvature estimate's average of ``d_t^2``, in place: :func:`_advance`'s first line,
    for a tangent with no rows."""
    average_squares(tangent.v, _sgd_direction(problem, hview, grads, params, step)[0])


HORIZON_UNITS = ("steps", "lr")


def forgetting(horizon: float | None, unit: str = "steps") -> Callable[[Tensor], float | Tensor]:
    """The factor ``mu_t`` the tangents are multiplied by at a step of learning rate ``lr_t``:
    ``1 - 1 / horizon`` (``unit="steps"``: forget over ``horizon`` steps), ``max(0, 1 - lr_t /
    horizon)`` (``unit="lr"``: over an optimization time ``sum_t lr_t`` of ``horizon``), or 1
    (``horizon=None``)."""
    if not horizon:
        return lambda lr: 1.0
    if unit == "lr":
        return lambda lr: torch.clamp(1.0 - lr / horizon, min=0.0)
    mu = 1.0 - 1.0 / horizon
    return lambda lr: mu


def _advance(tangent: CurvatureTangent, momentum: Tensor, direction: Tensor, lr: Tensor,
             dlr: Tensor | None, beta: Tensor | float, mu: float | Tensor, scale: float,
             count: int, wd: Tensor | float = 0.0) -> None:
    """One step of the recurrence of the module doc, in place. ``momentum`` is ``b_{t+1}``,
    ``direction`` ``d_t`` (n,); ``lr`` (n,) or (1,), ``dlr`` (R, n) or (R, 1), or None (no
    direct term); ``count`` the squared gradients in ``v`` after this step; ``wd`` the coupled
    weight decay, whose ``wd Z`` is exact (added to the capped model ``D_t``)."""
    z, zb, v, _ = tangent
    average_squares(v, direction)
    curvature = v * (scale / (1.0 - RHO ** count))
    curvature = torch.minimum(curvature, (2.0 * (1.0 + beta)) / lr.clamp(min=1e-30))
    if not isinstance(wd, float) or wd != 0.0:
        curvature = curvature + wd
    zb.mul_(beta).addcmul_(z, curvature)
    z.addcmul_(zb, lr, value=-1.0)
    if not keeps_all(mu):
        z.mul_(mu)
    if dlr is not None:
        z.addcmul_(dlr, momentum, value=-1.0)


def _sgd_values(problem: Problem, hview: Any, grads: Params, params: Params, old_state: Any,
                new_state: Any, step: int) -> HeavyBallStep:
    return _heavy_ball(problem, hview, grads, old_state, params, step)


def _sgd_advance(tangent: CurvatureTangent, values: HeavyBallStep, lr: Tensor,
                 dlr: Tensor | None, mu: float | Tensor, scale: float, count: int) -> None:
    _advance(tangent, values.b, values.d, lr, dlr, values.beta, mu, scale, count, values.wd)


def _sgd_decay(tangent: CurvatureTangent, values: HeavyBallStep, lr: Tensor, dwd: Tensor
               ) -> None:
    """SGD's coupled decay ``d_t = g_t + wd_t p_t``: its direct term ``(d wd_t / du) p_t``
    enters the momentum's tangent, and through it the parameters' (``-lr_t`` times it), in
    place."""
    tangent.zb.addcmul_(dwd, values.p)
    tangent.z.addcmul_(dwd, lr * values.p, value=-1.0)


def _sgd_gradient(tangent: CurvatureTangent, values: HeavyBallStep, lr: Tensor) -> None:
    """A unit change of every entry of ``d_t`` on the tangent's last row: ``Zb += 1`` and,
    through it, ``Z -= lr_t`` (in place)."""
    tangent.zb[-1].add_(1.0)
    tangent.z[-1].sub_(lr)


SGD_RULE = CurvatureRule(_initial_sgd, _sgd_values, _sgd_advance, lambda values, lr: values.b,
                         _sgd_decay, _sgd_average, _sgd_gradient)
"""Heavy-ball SGD's rule (the module doc's recurrence); the direct term's vector is ``b_{t+1}``;
a carried coupled weight decay's is ``p_t`` in the momentum (:func:`_sgd_decay`)."""


LOSS_TERMS = ("last", "window", "carried")
"""What a hyperparameter of the train loss (a penalty, not an optimizer coefficient) gets from
``curvature``: ``last``, the window's last step (exact, reverse mode through it); ``window``,
also the window's earlier steps; ``carried``, also the earlier windows', forgotten as the
learning rate's tangents (``horizon``). See :func:`curvature_samples`."""


def loss_term_rows(loss_terms: str) -> int:
    """The tangent rows the loss-term signal adds: 1 for ``window`` and ``carried``, else 0."""
    return 0 if loss_terms == "last" else 1


def curvature_segment(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                      stop: int, val_batches: list[Batch], carry: Any = None, *,
                      horizon: float | None = 500, horizon_unit: str = "steps",
                      scale: float | str | None = None, loss_terms: str = "last") -> Segment:
    """Train steps ``start .. stop-1`` carrying the tangents by the optimizer's rule
    (:func:`rule_for`), then the hypergradient of the module doc at the validation batches.
    The carry is the tangent (``None`` at the start of the run); the one given is not modified
    (a failed window is discarded)."""
    return curvature_samples(problem, state, raw, start, stop, [val_batches], carry,
                             horizon=horizon, horizon_unit=horizon_unit, scale=scale,
                             loss_terms=loss_terms)[0]


def curvature_samples(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                      stop: int, val_sets: list[list[Batch]], carry: Any = None, *,
                      horizon: float | None = 500, horizon_unit: str = "steps",
                      scale: float | str | None = None, loss_terms: str = "last",
                      caller: str = "online curvature") -> list[Segment]:
    """:func:`curvature_segment` at each of ``val_sets``: the window, its last step's graph and
    the tangents once; per set one validation gradient through that step, contracted with the
    tangents. ``caller`` names the call in a non-finite train loss's error.

    ``loss_terms`` (:data:`LOSS_TERMS`): what the hyperparameters read by the train loss get
    besides the last step. With ``window`` or ``carried``, the tangent's last row ``P`` (n,)
    carries the parameters' response to a unit change of every gradient entry at every earlier
    step (the rule's ``gradient``), and the train gradient's Jacobian ``J = d g / du`` is
    frozen at the last step: the earlier steps' effect ``a^T diag(P) J = d <g_last, a * P> /
    du`` (``a`` the validation gradient at the window's end) is one more backward pass through
    the last step's gradient per set. Exact where ``J`` is constant and the curvature model is
    (a loss linear in theta, ``curvature_scale=0``); for a ``J`` that depends on the batch
    (one weight per training example) it credits the last batch with every step's effect.
    ``window`` starts ``P`` at 0 in each window; ``carried`` keeps it, forgotten by
    ``horizon``."""
    rule = rule_for(problem)
    forget = forgetting(horizon, horizon_unit)
    hp = problem.hparams
    unit = loss_term_rows(loss_terms) == 1
    tangent = rule.initial(problem, raw, int(unit)) if carry is None else carry
    tangent = type(tangent)(*(t.clone() for t in tangent))
    if unit and loss_terms == "window":  # the loss-term row starts over in each window
        for rows_tensor in tangent:
            if rows_tensor.dim() == 2:
                rows_tensor[-1].zero_()
    scale = batch_scale(problem, start, scale)
    coefs = _window_coefficients(problem, raw, start, stop)
    if unit:  # the coefficients' direct terms leave the loss-term row alone
        coefs = coefs._replace(dlrs=coefs.dlrs.with_zero_row(),
                               dwds=None if coefs.dwds is None else coefs.dwds.with_zero_row())
    lrs, dlrs, dwds, rows = coefs
    hview = hp.view(problem.raw_tensors(raw))
    losses = torch.empty(stop - start, dtype=problem.hparam_dtype, device=problem.device)
    (params, buffers, opt_state), count = _carry(problem, rule, hview, coefs, tangent, state,
                                                 start, stop - 1, forget, scale, losses, unit)
    # the last step: exactly by reverse mode (the state before it constant) ...
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    hleaves = hp.view(leaves)
    theta = {k: v.detach().requires_grad_() for k, v in params.items()}
    grads, new_buffers, loss = train_gradient(problem, theta, buffers, hleaves, stop - 1,
                                              create_graph=True)
    new_params, new_state = problem.optimizer.update(grads, opt_state, theta, hleaves, stop - 1)
    losses[-1] = loss.detach()
    check_finite_losses(losses, caller, start)
    val_losses = [validation_loss(at_val_batches(problem, val), new_params, new_buffers, hleaves)
                  for val in val_sets]
    sampled = sample_grads(val_losses, [*leaves.values(), *new_params.values()], retain=unit)
    # ... and the carried tangents through it (without its direct term, in the part above)
    with torch.no_grad():
        plain = {k: g.detach() for k, g in grads.items()}
        values = rule.values(problem, hview, plain, params, opt_state, detach_tree(new_state),
                             stop - 1)
        last_lr = lrs[-1]
        rule.advance(tangent, values, last_lr, None, forget(last_lr), scale, count + 1)
        tangent.steps.fill_(count + 1)
        z = tangent.z[:-1] if unit else tangent.z
        grad = [_direct_and_carried(hp.flatten(dict(zip(leaves, g[: len(leaves)], strict=True))),
                                    z, flat(g[len(leaves):]), rows)
                for g in sampled]
    if unit:  # the earlier steps' effect through the train loss, J frozen at the last step
        grad = [g + _loss_term_part(problem, grads, leaves, tangent.z[-1], flat(s[len(leaves):]),
                                    retain=j < len(sampled) - 1)
                for j, (g, s) in enumerate(zip(grad, sampled, strict=True))]
    with torch.no_grad():
        tangent.z.addcmul_(dlrs[-1], rule.direct(values, last_lr), value=-1.0)
        if dwds is not None:
            rule.decay(tangent, values, last_lr, dwds[-1])
        if unit:
            rule.gradient(tangent, values, last_lr)
    end = detached_state(TrainState(new_params, new_buffers, new_state))
    return [Segment(end, hp.unflatten(g), float(value.detach()), losses, tangent)
            for g, value in zip(grad, val_losses, strict=True)]


def _with_zero_row(derivatives: Tensor) -> Tensor:
    """``(K, R, m)`` derivatives with a row of zeros after the ``R``: ``(K, R + 1, m)``."""
    k, _, m = derivatives.shape
    return torch.cat([derivatives, derivatives.new_zeros((k, 1, m))], dim=1)


def _loss_term_part(problem: Problem, grads: Params, leaves: dict[str, Tensor], response: Tensor,
                    val_theta: Tensor, *, retain: bool) -> Tensor:
    """``d <g, a * P> / du`` (flat raw values): ``g`` the last step's train gradient (its graph
    to the raw ``leaves``), ``a`` the validation gradient ``val_theta`` (n,), ``P`` the
    loss-term row ``response`` (n,); 0 for raw values the train loss does not read."""
    weights = (val_theta.to(response.dtype) * response).detach()
    parts = torch.split(weights, [g.numel() for g in grads.values()])
    total = sum((g * w.reshape(g.shape).to(g.dtype)).sum()
                for g, w in zip(grads.values(), parts, strict=True))
    inputs = list(leaves.values())
    found: tuple[Tensor | None, ...] = (None,) * len(inputs)
    if isinstance(total, Tensor) and total.requires_grad:  # else g has no graph (a linear loss)
        found = torch.autograd.grad(total, inputs, allow_unused=True, retain_graph=retain)
    return problem.hparams.flatten(dict(zip(leaves, zeros_for_unused(found, inputs),
                                            strict=True)))


def _direct_and_carried(direct: Tensor, z: Tensor, val_theta: Tensor, rows: Tensor | None
                        ) -> Tensor:
    """``dL/du`` of the module doc: the last step's direct part plus ``Zt @ grad_theta L_val``
    (``z`` (R, n) for the carried rows ``rows`` of the raw values, all of them when ``None``;
    ``val_theta`` (n,)), in the direct part's dtype; the rows not carried get their direct
    part only (their tangents are 0, :func:`carried_rows`)."""
    indirect = (z @ val_theta.to(z.dtype)).to(direct.dtype)
    if rows is not None:
        indirect = direct.new_zeros(direct.shape).index_copy_(0, rows.to(direct.device), indirect)
    return direct + indirect


class _Coefficients(NamedTuple):
    """The carried coefficients over a window ``[start, stop)``, per step (``coefs.lrs[i]``,
    :class:`WindowValues`): ``lr_t`` (n,) or (1,), ``d lr_t / du`` (R, n) or (R, 1) for the
    carried rows ``rows`` (None: all), ``d wd_t / du`` likewise or None
    (:func:`lr_derivatives`, :func:`decay_derivatives`)."""

    lrs: WindowValues
    dlrs: WindowValues
    dwds: WindowValues | None
    rows: Tensor | None


def _window_coefficients(problem: Problem, raw: dict[str, Tensor], start: int, stop: int
                         ) -> _Coefficients:
    """The tangent's rows only: the others stay 0 (carried_rows)."""
    sizes = [p.numel() for p in problem.params.values()]
    lrs, dlrs = lr_derivatives(problem, raw, start, stop, carried=True)
    dwds = decay_derivatives(problem, raw, start, stop)
    return _Coefficients(WindowValues(lrs, sizes), WindowValues(dlrs, sizes),
                         None if dwds is None else WindowValues(dwds, sizes),
                         carried_rows(problem))


def _carry(problem: Problem, rule: CurvatureRule, hview: Any, coefs: _Coefficients,
           tangent: Any, state: TrainState, start: int, stop: int,
           forget: Callable[[Tensor], float | Tensor], scale: float, losses: Tensor,
           unit: bool = False) -> tuple[TrainState, int]:
    """Train steps ``start .. stop-1`` of the window that begins at ``start`` (``coefs`` and
    ``losses`` are indexed from it) without a graph, advancing ``tangent`` in place by
    ``rule`` with every step's direct term (``unit``: also the loss-term row's, the rule's
    ``gradient``); the state at ``stop`` and the squared gradients averaged by then (the
    tangent's ``steps`` is not updated)."""
    count = int(tangent.steps)  # read once per window: the steps add no host synchronisation
    carried = tangent.z.shape[0] > 0  # no rows: only the squared-gradient average moves
    params, buffers, opt_state = state
    for step in range(start, stop):
        theta = {k: v.detach().requires_grad_() for k, v in params.items()}
        grads, buffers, loss = train_gradient(problem, theta, buffers, hview, step,
                                              create_graph=False)
        with torch.no_grad():
            new_params, new_state = problem.optimizer.update(grads, opt_state, params, hview,
                                                             step)
            i, count = step - start, count + 1
            if not carried:
                rule.average(problem, hview, grads, params, tangent, step)
            else:
                values = rule.values(problem, hview, grads, params, opt_state, new_state, step)
                lr = coefs.lrs[i]  # this step's, over the entries (WindowValues)
                rule.advance(tangent, values, lr, coefs.dlrs[i], forget(lr), scale, count)
                if coefs.dwds is not None:
                    rule.decay(tangent, values, lr, coefs.dwds[i])
                if unit:
                    rule.gradient(tangent, values, lr)
        params, opt_state = new_params, new_state
        buffers = {k: v.detach() for k, v in buffers.items()}
        losses[i] = loss.detach()
    return TrainState(params, buffers, opt_state), count


def curvature_head(problem: Problem, raw: dict[str, Tensor], stop: int, *,
                   scale: float | str | None = None) -> tuple[TrainState, Any, Tensor]:
    """Steps ``0 .. stop-1`` from theta_0 carrying the tangents (no forgetting, every step's
    direct term): the state ``s_stop`` (no graph), its modelled tangent ``Z_stop = d s_stop /
    du`` (:func:`state_tangents` pairs it with the state) and the train losses ``(stop,)``.
    The head of :func:`~hyperdiff.methods.truncated.truncated`'s ``head="curvature"``."""
    rule = rule_for(problem)
    raw = {n: v.detach() for n, v in raw.items()}
    hview = problem.hparams.view(raw)
    with torch.no_grad():
        state = initial_state(problem, hview, differentiable=False)
    scale = batch_scale(problem, 0, scale)
    tangent = rule.initial(problem, raw)
    losses = torch.empty(stop, dtype=problem.hparam_dtype, device=problem.device)
    state, count = _carry(problem, rule, hview, _window_coefficients(problem, raw, 0, stop),
                          tangent, state, 0, stop, forgetting(None), scale, losses)
    tangent.steps.fill_(count)
    return state, tangent, losses


def state_tangents(tangent: Any, state: TrainState) -> list[tuple[Tensor, Params]]:
    """The tangents of a carried ``tangent`` paired with the tensors of ``state`` they are the
    derivatives of, ``(Z (R, n), tensors flattened in problem.params order)``: the parameters'
    ``z``, then the optimizer state's fields in order (heavy-ball's momentum ``zb``; Adam's
    moments ``zm``, ``zv``); a field that holds no tensors (SGD without momentum) is left out."""
    fields = list(tangent)[1:1 + len(state.opt_state)]
    pairs = [(tangent.z, state.params)]
    pairs += [(z, dict(field)) for z, field in zip(fields, state.opt_state, strict=True)
              if field]
    return pairs


def carried_hypergradient(direct: Tensor, pairs: list[tuple[Tensor, Params]],
                          adjoints: list[Tensor], rows: Tensor | None) -> Tensor:
    """``direct + sum_j Z_j @ a_j`` (flat raw values): the effect through a carried state of
    the raw values, ``a_j`` (n,) the adjoint of the state tensors of ``pairs[j]``
    (:func:`state_tangents`), ``rows`` the tangents' raw values (None: all)."""
    z = torch.cat([pair[0] for pair in pairs], dim=1)
    return _direct_and_carried(direct, z, torch.cat(adjoints), rows)


CAPABILITIES = Capabilities(exact=False, offline=True, online=True, carries_state=True,
                            data_parallel=True, long_horizon=True,
                            segment_options=("horizon", "horizon_unit", "curvature_scale",
                                             "loss_terms"))
"""Approximate (the curvature model), offline and online. Data-parallel: it takes its gradients
from the train loss (``train_gradient``), which ``hd.distributed.data_parallel`` averages over
the ranks."""

ONLINE_HORIZON = 500
"""The online forgetting horizon of ``horizon="auto"`` (in ``horizon_unit``)."""


SCALE_RULES = ("auto", "rows")
"""The curvature scale's named rules (:func:`batch_scale`); ``None`` is ``"auto"``."""


def batch_scale(problem: Problem, step: int, scale: float | str | None) -> float:
    """The curvature model's scale for the batch of ``step``: a number as it is; ``"rows"``:
    the training batch's rows ``B``; ``None`` (``"auto"``): ``B``, or 1 when every step trains
    on the same rows (the source's ``fixed_batch``: no sampling noise, module doc). The method
    reads it once per window, at the window's first step (offline: step 0), and uses it for
    every step of the window: a source whose batches differ in size gets the first one's.

    >>> import hyperdiff as hd
    >>> def loss(p, h, b):
    ...     return ((b @ p["w"]) ** 2).mean()
    >>> x = torch.ones(5, 2)
    >>> p = hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.1)),
    ...                     {"w": torch.zeros(2)}, optimizer=hd.sgd("lr"), train_data=x,
    ...                     val_data=x, steps=3)
    >>> batch_scale(p, 0, None), batch_scale(p, 0, "rows"), batch_scale(p, 0, 0.5)
    (1.0, 5.0, 0.5)
    >>> from dataclasses import replace
    >>> q = replace(p, train_data=hd.minibatches(x, batch_size=2))
    >>> batch_scale(q, 0, None), batch_scale(q, 0, "rows")
    (2.0, 2.0)
    """
    if scale is None or scale == "auto":
        if getattr(problem.train_data, "fixed_batch", False):
            return 1.0
        scale = "rows"
    if scale == "rows":
        return float(batch_rows(problem.train_data.batch(step, problem.seed)))
    return float(scale)


def curvature_options(caller: str, horizon: float | str | None, horizon_unit: str,
                      curvature_scale: float | str | None
                      ) -> tuple[float | str | None, str, float | str | None]:
    """``(horizon, horizon_unit, curvature_scale)`` checked (``horizon`` ``"auto"``, None, an
    int >= 1 in steps or a number > 0 in ``"lr"`` units; ``curvature_scale`` None or
    ``"auto"`` (both returned as None), ``"rows"``, 0 or a number > 0: :func:`batch_scale`)."""
    if horizon_unit not in HORIZON_UNITS:
        raise fail(caller, "horizon_unit", f"one of {list(HORIZON_UNITS)}", horizon_unit)
    if isinstance(horizon, str) and horizon != "auto":
        raise fail(caller, "horizon", "'auto', None or a number > 0", horizon)
    if horizon is not None and horizon != "auto":
        horizon = (positive_int(caller, "horizon", horizon) if horizon_unit == "steps"
                   else positive_float(caller, "horizon", horizon))
    if curvature_scale == "auto":
        curvature_scale = None
    elif isinstance(curvature_scale, str):
        if curvature_scale not in SCALE_RULES:
            raise fail(caller, "curvature_scale", f"None, one of {list(SCALE_RULES)}, 0 or a "
                       "number > 0", curvature_scale)
    elif curvature_scale is not None:
        valid = is_number(curvature_scale) and 0 <= float(curvature_scale) < float("inf")
        if not valid:
            raise fail(caller, "curvature_scale", f"None, one of {list(SCALE_RULES)}, 0 or a "
                       "number > 0", curvature_scale)
        curvature_scale = float(curvature_scale)
    return horizon, horizon_unit, curvature_scale


def horizons(horizon: float | str | None) -> tuple[float | None, float | None]:
    """``(online, offline)`` forgetting horizons of the option ``horizon``: ``"auto"`` forgets
    over :data:`ONLINE_HORIZON` online and never offline; a value given applies to both."""
    if horizon == "auto":
        return ONLINE_HORIZON, None
    return horizon, horizon  # type: ignore[return-value]


def curvature_offline(problem: Problem, raw: dict[str, Tensor], *, horizon: float | None = None,
                      horizon_unit: str = "steps", scale: float | str | None = None,
                      loss_terms: str = "last") -> HyperGradient:
    """The offline call: the segment ``[0, T)`` from theta_0 at the problem's validation data
    (:func:`curvature_segment` with no carry), packaged by ``finish``. ``horizon=None`` keeps
    the whole run's tangents: a fixed training's hyperparameters have no past to forget.

    Raises:
        HyperdiffError: an optimizer the tangent rule does not describe
            (:func:`check_optimizer`) or an initialization hyperparameter (its tangent
            ``d theta_0 / du`` is not carried: use ``reverse``).
    """
    started = time.perf_counter()
    check_optimizer(problem)
    if problem.initialization is not None:
        raise HyperdiffError(
            f"curvature: the problem must have no initialization hyperparameter (got "
            f"{problem.initialization!r}; the method carries the learning rate's and the weight "
            "decay's tangents only): use method 'reverse' or 'forward' for it")
    raw = {n: v.detach() for n, v in raw.items()}
    with torch.no_grad():
        state = initial_state(problem, problem.hparams.view(raw), differentiable=False)
    segment = curvature_samples(problem, state, raw, 0, problem.steps, [problem.val_data],
                                horizon=horizon, horizon_unit=horizon_unit, scale=scale,
                                loss_terms=loss_terms, caller="curvature")[0]
    return finish(problem, raw, method="curvature",
                  value=torch.tensor(segment.value, dtype=torch.float64, device=problem.device),
                  grad=segment.grad,
                  params=segment.state.params, buffers=segment.state.buffers,
                  train_losses=segment.train_losses, started=started, horizon=horizon)


def curvature(horizon: float | str | None = "auto", horizon_unit: str = "steps",
              curvature_scale: float | str | None = None, loss_terms: str = "last") -> Method:
    """The method of the module doc: ``method.segment(...)`` (online windows) and
    ``method(problem)`` (offline, :func:`curvature_offline`) carry the learning rate's (and a
    carried weight decay's) tangents under a diagonal curvature model (heavy-ball SGD, Adam,
    AdamW).

    Args:
        horizon: the tangents forget over this many steps (``horizon_unit="steps"``) or this
            optimization time ``sum_t lr_t`` (``"lr"``); ``None``: never (:func:`forgetting`);
            ``"auto"``: :data:`ONLINE_HORIZON` online, never offline (:func:`horizons`).
        curvature_scale: the curvature estimate's scale: ``None`` or ``"auto"`` the training
            batch's rows, or 1 with a fixed batch (before session 34 the rows there too);
            ``"rows"`` the batch's rows always; or a number (:func:`batch_scale`).
        loss_terms: what a hyperparameter of the train loss gets (:data:`LOSS_TERMS`,
            :func:`curvature_samples`): the last step only (``"last"``), or also the window's
            earlier steps (``"window"``) and the earlier windows' (``"carried"``) through its
            Jacobian frozen at the last step.
    """
    horizon, horizon_unit, scale = curvature_options("curvature", horizon, horizon_unit,
                                                     curvature_scale)
    if loss_terms not in LOSS_TERMS:
        raise fail("curvature", "loss_terms", f"one of {list(LOSS_TERMS)}", loss_terms)
    online, offline = horizons(horizon)
    options: dict[str, Any] = {"horizon": horizon, "horizon_unit": horizon_unit,
                               "curvature_scale": scale}
    if loss_terms != "last":  # the key of runs from before the option stays out of the record
        options["loss_terms"] = loss_terms
    return Method("curvature",
                  partial(curvature_offline, horizon=offline, horizon_unit=horizon_unit,
                          scale=scale, loss_terms=loss_terms), options,
                  capabilities=CAPABILITIES,
                  segment_fn=partial(curvature_segment, horizon=online,
                                     horizon_unit=horizon_unit, scale=scale,
                                     loss_terms=loss_terms),
                  samples_fn=partial(curvature_samples, horizon=online,
                                     horizon_unit=horizon_unit, scale=scale,
                                     loss_terms=loss_terms),
                  carry_fn=lambda problem, raw, state: initial_tangent(problem, raw, loss_terms),
                  saved_carry_fn=saved_tangent_rows if loss_terms == "last" else None,
                  check_fn=check_optimizer)


__all__ = ["CAPABILITIES", "HORIZON_UNITS", "JACOBIAN_ROWS", "LOSS_TERMS", "ONLINE_HORIZON",
           "SCALE_RULES", "SGD_RULE", "CurvatureRule", "CurvatureTangent", "HeavyBallStep",
           "WindowValues", "batch_scale",
           "carried_hypergradient", "check_optimizer", "curvature", "curvature_head",
           "curvature_offline", "curvature_options", "curvature_samples", "curvature_segment",
           "forgetting", "horizons", "initial_tangent", "loss_term_rows", "lr_derivatives",
           "rule_for", "state_tangents"]
