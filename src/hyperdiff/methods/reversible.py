"""Reversible learning: run SGD with momentum backwards exactly instead of storing it.

After Maclaurin, Duvenaud & Adams (2015), "Gradient-based hyperparameter optimization through
reversible learning". Heavy-ball SGD (``hd.sgd``, torch's form) is

    d_t = grad L_train(theta_t) + wd_t * theta_t
    v_t = mu_t * v_{t-1} + c_t * d_t        (c_0 = 1 and v_0 = d_0; c_t = 1 - dampening)
    theta_{t+1} = theta_t - lr_t * v_t.

Given ``(theta_{t+1}, v_t)`` the step can be undone: ``theta_t = theta_{t+1} + lr_t v_t``, then
``d_t`` is recomputed at ``theta_t`` and ``v_{t-1} = (v_t - c_t d_t) / mu_t``. In floating point
this is unstable (dividing by ``mu < 1`` amplifies the rounding errors of every step), so the
forward pass keeps ``theta`` and ``v`` as exact integers ``X = round(x * 2^R)`` (R =
``fraction_bits``). Additions of rounded quantities are exactly invertible; the product by
``mu ~ n / D`` (``D = 2^40``, ``n = round(mu D)``) is made a bijection of the pair
(integer, information buffer):

    forward:  push(X mod D, base D);  X <- (X div D) * n + pop(base n)
    backward: q, r = divmod(X, n); push(r, base n);  X <- q * D + pop(base D)

where the buffer is one arbitrary-precision integer per element, ``push(x, b): S <- S b + x``
and ``pop(b): S, x <- divmod(S, b)``. It grows by ``log2(1 / mu)`` bits per element and step
(0.15 bits for mu = 0.9): the "information the momentum decay destroys". The backward pass
recovers every ``(theta_t, v_{t-1})`` bit for bit (checked: the buffer ends empty and ``v_{-1}
= 0``, ``diagnostics["reversal_error"] == 0``) and accumulates the hypergradient with one
vector-Jacobian product of the float step per step, so memory does not grow with T except for
the buffer. The trajectory differs from the floating-point one by the rounding to ``2^-R``.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..errors import HyperdiffError, NonFiniteError, describe
from ..hyperparams import HParamView
from ..models import StepContext
from ..optimizers import SGDState, resolve
from ..problem import Problem, call_loss
from ..training import check_finite_losses, grads_of, train_step, validation_loss
from .base import HyperGradient, Method, finish, zeros_for_unused

DENOMINATOR_BITS = 40  # mu is represented as n / 2**40
LIMB_BITS = 22  # limb * 2**40 + carry stays below 2**63
LIMB_MASK = (1 << LIMB_BITS) - 1


class InfoBuffer:
    """One non-negative big integer per element: little-endian limbs of ``LIMB_BITS`` bits."""

    def __init__(self, numel: int):
        self.limbs = torch.zeros((0, numel), dtype=torch.int64)
        self.peak_limbs = 0

    def push(self, digit: Tensor, base: Tensor | int) -> None:
        """``S <- S * base + digit`` for ``0 <= digit < base``."""
        carry = digit
        for i in range(self.limbs.shape[0]):
            t = self.limbs[i] * base + carry
            self.limbs[i] = t & LIMB_MASK
            carry = t >> LIMB_BITS
        rows = []
        while bool(carry.any()):
            rows.append(carry & LIMB_MASK)
            carry = carry >> LIMB_BITS
        if rows:
            self.limbs = torch.cat([self.limbs, torch.stack(rows)])
            self.peak_limbs = max(self.peak_limbs, self.limbs.shape[0])

    def pop(self, base: Tensor | int) -> Tensor:
        """``S, digit <- divmod(S, base)``; returns ``digit``."""
        rem = torch.zeros(self.limbs.shape[1], dtype=torch.int64)
        for i in range(self.limbs.shape[0] - 1, -1, -1):
            t = (rem << LIMB_BITS) | self.limbs[i]
            self.limbs[i] = torch.div(t, base, rounding_mode="floor")
            rem = t - self.limbs[i] * base
        while self.limbs.shape[0] and not bool(self.limbs[-1].any()):
            self.limbs = self.limbs[:-1]
        return rem


def scale_down(x: Tensor, n: Tensor, info: InfoBuffer) -> Tensor:
    """Exactly invertible ``x * n / 2^40`` (rounded) that saves the lost bits in ``info``."""
    d = 1 << DENOMINATOR_BITS
    info.push(x & (d - 1), d)
    return (x >> DENOMINATOR_BITS) * n + info.pop(n)


def scale_up(x: Tensor, n: Tensor, info: InfoBuffer) -> Tensor:
    """The inverse of :func:`scale_down`."""
    q = torch.div(x, n, rounding_mode="floor")
    info.push(x - q * n, n)
    return (q << DENOMINATOR_BITS) + info.pop(1 << DENOMINATOR_BITS)


class FixedPoint:
    """Conversions between float dicts and one flat int64 vector ``round(x * 2^R)``."""

    def __init__(self, problem: Problem, fraction_bits: int):
        self.shapes = {k: v.shape for k, v in problem.params.items()}
        self.dtype, self.bits = problem.dtype, fraction_bits
        self.limit = 2.0 ** (62 - fraction_bits)

    def to_int(self, x: Tensor, what: str, step: int) -> Tensor:
        x = x.to(torch.float64)
        if not bool((x.abs() < self.limit).all()):
            raise NonFiniteError(
                f"reversible: {what} left the fixed-point range +-{self.limit:g} (or is not "
                f"finite) at step {step}; lower fraction_bits or the learning rate"
            )
        return torch.round(x * 2.0**self.bits).to(torch.int64)

    def check_range(self, P: Tensor, V: Tensor, step: int) -> None:
        bound = 1 << 62
        if int(P.abs().max()) >= bound or int(V.abs().max()) >= bound:
            raise NonFiniteError(
                f"reversible: the parameters or velocity left the fixed-point range "
                f"+-{self.limit:g} at step {step}; lower fraction_bits or the learning rate"
            )

    def to_float(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return (x.to(torch.float64) * 2.0**-self.bits).to(dtype or self.dtype)

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        sizes = [s.numel() for s in self.shapes.values()]
        parts = torch.split(flat, sizes)
        return {k: v.view(s) for (k, s), v in zip(self.shapes.items(), parts, strict=True)}


def _coefficient(problem: Problem, name: str, hview: HParamView, step: int) -> Tensor:
    """Optimizer coefficient ``name`` at ``step`` as one flat float64 vector over all params."""
    coef = problem.optimizer.coefficients[name]
    parts = [
        torch.as_tensor(resolve(coef, hview, step, k), dtype=torch.float64).detach()
        .expand(p.shape).reshape(-1)
        for k, p in problem.params.items()
    ]
    return torch.cat(parts)


def _check_problem(problem: Problem, hview: HParamView) -> float:
    """Refuse what cannot be reversed; return the velocity gain ``1 - dampening``."""
    opt = problem.optimizer
    if opt.name != "sgd":
        raise HyperdiffError(
            f"reversible: the optimizer must be hd.sgd with momentum (got {opt.name}); use "
            "checkpointed() for a memory-saving exact method with other optimizers"
        )
    momentum = opt.coefficients["momentum"]
    if isinstance(momentum, (int, float)) and momentum == 0:
        raise HyperdiffError(
            "reversible: the sgd momentum must be non-zero, plain SGD is not reversible (got 0)"
        )
    if problem.buffers:
        raise HyperdiffError(
            "reversible: the model must have no buffers (got BatchNorm running statistics "
            f"{sorted(problem.buffers)}); use checkpointed()"
        )
    # probe the update rule at params 0, grads 1, v = 0: v' = 1 - dampening, and
    # theta' = -lr v' for heavy ball but -lr (1 + mu) v' for Nesterov
    step = min(1, problem.steps - 1)
    zeros = {k: torch.zeros(p.shape, dtype=torch.float64) for k, p in problem.params.items()}
    ones = {k: torch.ones_like(v) for k, v in zeros.items()}
    with torch.no_grad():
        new, state = opt.update(ones, SGDState(zeros), zeros, hview, step)
    velocity = torch.cat([state.momentum[k].reshape(-1) for k in zeros])
    lr = _coefficient(problem, "lr", hview, step)
    expected = -lr * velocity
    got = torch.cat([new[k].reshape(-1) for k in zeros])
    if not torch.allclose(got, expected, rtol=1e-12, atol=0):
        raise HyperdiffError(
            "reversible: the sgd optimizer must use heavy-ball momentum (got nesterov=True)"
        )
    return float(velocity[0]) if step == 1 else 1.0


def _gradient(problem: Problem, params: dict[str, Tensor], hview: HParamView, step: int):
    """``grad L_train(theta_t)`` without a graph, and the loss: the same call in both passes."""
    batch = problem.train_data.batch(step, problem.seed)
    ctx = StepContext(step=step, seed=problem.seed, train=True, buffers={})
    with torch.enable_grad():
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = call_loss(problem, "train_loss", params, hview, batch, ctx)
        grads = grads_of(loss, params, create_graph=False)
    return torch.cat([grads[k].detach().reshape(-1) for k in params]), loss.detach()


class _Step:
    """The integer pieces of step t, computed identically forward and backward."""

    def __init__(self, problem: Problem, fixed: FixedPoint, hview: HParamView, gain: float,
                 step: int):
        self.problem, self.fixed, self.hview, self.step = problem, fixed, hview, step
        self.lr = _coefficient(problem, "lr", hview, step)
        self.gain = 1.0 if step == 0 else gain
        mu = _coefficient(problem, "momentum", hview, step)
        self.n = torch.round(mu * 2.0**DENOMINATOR_BITS).to(torch.int64)
        if not bool(((mu > 0) & (self.n >= 1) & (mu <= 1)).all()):
            raise HyperdiffError(
                f"reversible: momentum must be in (0, 1] at every step (got {describe(mu)} at "
                f"step {step})"
            )
        weight_decay = problem.optimizer.coefficients["weight_decay"]
        self.wd = None if weight_decay == 0 else _coefficient(problem, "weight_decay", hview, step)

    def increment(self, P: Tensor) -> tuple[Tensor, Tensor]:
        """``round(c_t * d_t * 2^R)`` at ``theta_t = P 2^-R``, and the train loss there."""
        theta = self.fixed.to_float(P)
        g, loss = _gradient(self.problem, self.fixed.split(theta), self.hview, self.step)
        d = g.to(torch.float64)
        if self.wd is not None:
            d = d + self.wd * theta.to(torch.float64)
        return self.fixed.to_int(self.gain * d, "the velocity increment", self.step), loss

    def displacement(self, V: Tensor) -> Tensor:
        """``round(lr_t * v_t * 2^R)``."""
        v = self.fixed.to_float(V, torch.float64)
        return self.fixed.to_int(self.lr * v, "the parameter step", self.step)


def _vjp(problem, fixed, theta, velocity, raw, adj_theta, adj_v, step):
    """Adjoints of ``(theta_t, v_{t-1})`` and the raw values through the float step t."""
    p = {k: v.requires_grad_() for k, v in fixed.split(fixed.to_float(theta)).items()}
    b = {k: v.requires_grad_() for k, v in fixed.split(fixed.to_float(velocity)).items()}
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    new_p, _, new_state, _ = train_step(
        problem, p, {}, SGDState(b), problem.hparams.view(leaves), step, differentiable=True
    )
    outputs = list(new_p.values()) + list(new_state.momentum.values())
    inputs = list(p.values()) + list(b.values()) + list(leaves.values())
    grads = torch.autograd.grad(
        outputs, inputs, list(adj_theta.values()) + list(adj_v.values()), allow_unused=True
    )
    grads = zeros_for_unused(grads, inputs)
    k = len(p)
    return (dict(zip(p, grads[:k], strict=True)), dict(zip(b, grads[k : 2 * k], strict=True)),
            grads[2 * k :])


def _reversible(problem: Problem, raw: dict[str, Tensor], fraction_bits: int) -> HyperGradient:
    started = time.perf_counter()
    raw = {n: v.detach() for n, v in raw.items()}
    hview = problem.hparams.view(raw)
    gain = _check_problem(problem, hview)
    fixed = FixedPoint(problem, fraction_bits)
    theta0 = torch.cat([v.reshape(-1) for v in problem.params.values()])
    P = fixed.to_int(theta0, "the initial parameters", 0)
    P_initial, V = P.clone(), torch.zeros_like(P)
    info = InfoBuffer(P.numel())

    losses = []
    for t in range(problem.steps):  # forward: exact integer training
        step = _Step(problem, fixed, hview, gain, t)
        increment, loss = step.increment(P)
        losses.append(loss)
        V = (scale_down(V, step.n, info) if t > 0 else V) + increment
        P = P - step.displacement(V)
        fixed.check_range(P, V, t)
    losses_t = torch.stack(losses)
    check_finite_losses(losses_t, "reversible")

    theta_T = {k: v.requires_grad_() for k, v in fixed.split(fixed.to_float(P)).items()}
    leaves = {n: v.clone().requires_grad_() for n, v in raw.items()}
    value = validation_loss(problem, theta_T, {}, problem.hparams.view(leaves))
    inputs = list(theta_T.values()) + list(leaves.values())
    grads = zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True), inputs)
    adj_theta = dict(zip(theta_T, grads[: len(theta_T)], strict=True))
    adj_v = {k: torch.zeros_like(v) for k, v in adj_theta.items()}
    grad_raw = grads[len(theta_T) :]
    info_bytes = info.limbs.numel() * 8

    for t in range(problem.steps - 1, -1, -1):  # backward: undo step t, then one vjp
        step = _Step(problem, fixed, hview, gain, t)
        P = P + step.displacement(V)
        increment, _ = step.increment(P)
        V = V - increment
        if t > 0:
            V = scale_up(V, step.n, info)
        adj_theta, adj_v, vjp_raw = _vjp(problem, fixed, P, V, raw, adj_theta, adj_v, t)
        grad_raw = [g + v for g, v in zip(grad_raw, vjp_raw, strict=True)]

    error = int((P - P_initial).abs().max()) + int(V.abs().max()) + info.limbs.shape[0]
    return finish(
        problem, raw, method="reversible", value=value,
        grad=dict(zip(raw, grad_raw, strict=True)), params=theta_T, buffers={},
        train_losses=losses_t, started=started, reversal_error=error,
        info_bytes=info_bytes, info_bits_per_element=info.peak_limbs * LIMB_BITS,
        fraction_bits=fraction_bits,
    )


def reversible(fraction_bits: int = 44) -> Method:
    """Exact-arithmetic reversible SGD with momentum (memory nearly independent of T).

    Args:
        fraction_bits: R, the fixed-point resolution ``2^-R`` of parameters and velocities;
            their range is ``+-2^(62-R)``. The default 44 gives ``5.7e-14`` and ``+-2.6e5``.

    Raises:
        HyperdiffError: bad ``fraction_bits``; at call time, an optimizer other than heavy-ball
            ``hd.sgd`` with non-zero momentum in (0, 1], or a model with buffers.
        NonFiniteError: a value leaves the fixed-point range.
    """
    if isinstance(fraction_bits, bool) or not isinstance(fraction_bits, int) or not (
        8 <= fraction_bits <= 56
    ):
        raise HyperdiffError(
            f"reversible: fraction_bits must be an int in [8, 56] (got {describe(fraction_bits)})"
        )
    return Method(
        "reversible", lambda problem, raw: _reversible(problem, raw, fraction_bits),
        {"fraction_bits": fraction_bits},
    )
