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
``mu = n / d``, the closest fraction to ``mu`` with ``d <= 2^31`` (0.9 is 9 / 10; a typical
float64 ``mu`` is matched to about ``2^-62``, but one a hair away from a fraction with a small
denominator gets that fraction: 0.5 + 2^-40 runs as 1 / 2), is made a bijection of the pair
(integer X, information buffer S), with an error below one unit of ``2^-R``:

    forward:  e = pop(base n);  X, r = divmod(X n + e, d);  push(r, base d)
    backward: r = pop(base d);  X, e = divmod(X d + r, n);  push(e, base n)

where the buffer is one arbitrary-precision integer per element, ``push(x, b): S <- S b + x``
and ``pop(b): S, x <- divmod(S, b)``. It grows by ``log2(d / n) = log2(1 / mu)`` bits per
element and step (0.15 bits for mu = 0.9): the "information the momentum decay destroys".
The backward pass recovers every ``(theta_t, v_{t-1})`` bit for bit (checked: the buffer ends
empty and ``v_{-1} = 0``, else it raises) and accumulates the
hypergradient with one vector-Jacobian product of the float step per step, so memory does not
grow with T except for the buffer. The trajectory differs from the floating-point one by the
rounding to ``2^-R``.

When theta_0 is a hyperparameter (``hd.initialization``), training starts from it (rounded
to the grid) and the adjoint left at step 0 is its hypergradient.

**What it differentiates.** The training it runs has momentum ``n / d``
(``diagnostics["momentum_rounding"] = max |mu - n / d|``: 0 for 0.9, below 1e-16 for 0.123456789
or pi / 4, 2^-40 for 0.5 + 2^-40), and the backward pass differentiates exactly that
training (its vector-Jacobian products use ``n / d`` too, with the derivative of ``mu`` passed
straight through to a momentum hyperparameter). Earlier versions used ``n / 2^31``, which runs
0.9 as 0.8999999999068677 and put reversible mode 1e-10 away from reverse mode at short
horizons.
Measured in float64 (``python benchmarks/reversible_momentum.py``, the logistic problem of
the tests, mu = 0.9): relative difference from reverse mode 3.4e-13 (T = 100) and 2.2e-13
(T = 1000) with a constant momentum, 3.8e-13 and 2.3e-13 with a momentum hyperparameter.

**Segments** (:func:`reversible_segment`, an online window ``[t0, t1)``): the same, from the
parameters and the velocity ``v_{t0-1}`` of the state at ``t0`` (the optimizer state of
``hd.sgd``), rounded to the grid as theta_0 is; the backward pass is checked to end exactly at
that integer state with an empty buffer, and the window's state at ``t1`` is the integer
training's (within rounding to ``2^-R`` of the float one). Nothing in the reversal needs the
run's start: the buffer begins empty at ``t0`` as at step 0. The offline call is the segment
``[0, T)`` from theta_0, plus the adjoint at theta_0 for an initialization hyperparameter.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.engine.models import StepContext
from hyperdiff.engine.optimizers import Optimizer, SGDState, resolve, sgd
from hyperdiff.engine.problem import Problem, call_loss
from hyperdiff.engine.training import (
    TrainState,
    check_finite_losses,
    grads_of,
    initial_state,
    initial_vjp,
    validation_loss,
)
from hyperdiff.errors import HyperdiffError, NonFiniteError, describe
from hyperdiff.hparams.hyperparams import HParamView
from hyperdiff.methods.base import (
    Capabilities,
    HyperGradient,
    Method,
    Segment,
    finish,
    zeros_for_unused,
)
from hyperdiff.methods.segments import at_val_batches
from hyperdiff.typing import Batch
from hyperdiff.wording import option

DENOMINATOR_BITS = 31  # mu is represented as n / 2**31 with 1 <= n <= 2**31
DENOMINATOR = 1 << DENOMINATOR_BITS
LOW_MASK = DENOMINATOR - 1  # limbs have DENOMINATOR_BITS bits: limb * n + carry < 2**63

CAPABILITIES = Capabilities(exact=True, offline=True, online=True,
                            segment_options=("fraction_bits",))


class InfoBuffer:
    """One non-negative big integer S per element, as a list of little-endian 31-bit limbs.

    Pushing or popping a digit of base ``D = 2^31`` is adding or removing the lowest limb;
    other bases (``n <= D``) take one pass over the limbs.
    """

    def __init__(self, numel: int, device: torch.device | None = None):
        self.limbs: list[Tensor] = []
        self.numel, self.device, self.peak_limbs = numel, device, 0

    def push(self, digit: Tensor, base: Tensor | int) -> None:
        """``S <- S * base + digit`` for ``0 <= digit < base``."""
        if isinstance(base, int) and base == DENOMINATOR:
            self.limbs.insert(0, digit)
        else:
            carry = digit
            for i, limb in enumerate(self.limbs):
                t = limb * base + carry
                self.limbs[i], carry = t & LOW_MASK, t >> DENOMINATOR_BITS
            if bool(carry.any()):
                self.limbs.append(carry)  # carry < 2 base <= 2^32 after the last limb
                if bool((carry >> DENOMINATOR_BITS).any()):
                    self.limbs[-1] = carry & LOW_MASK
                    self.limbs.append(carry >> DENOMINATOR_BITS)
        self.peak_limbs = max(self.peak_limbs, len(self.limbs))

    def pop(self, base: Tensor | int) -> Tensor:
        """``S, digit <- divmod(S, base)``; returns ``digit``."""
        if isinstance(base, int) and base == DENOMINATOR:
            if self.limbs:
                return self.limbs.pop(0)
            return torch.zeros(self.numel, dtype=torch.int64, device=self.device)
        rem = torch.zeros(self.numel, dtype=torch.int64, device=self.device)
        for i in range(len(self.limbs) - 1, -1, -1):
            t = (rem << DENOMINATOR_BITS) | self.limbs[i]
            self.limbs[i] = torch.div(t, base, rounding_mode="floor")
            rem = t - self.limbs[i] * base
        while self.limbs and not bool(self.limbs[-1].any()):
            self.limbs.pop()
        return rem

    @property
    def nbytes(self) -> int:
        return sum(limb.numel() * limb.element_size() for limb in self.limbs)


def scale_down(x: Tensor, n: Tensor, info: InfoBuffer, d: Tensor | int = DENOMINATOR
               ) -> Tensor:
    """``x' = floor((x n + e) / d)`` with ``e = pop(base n)``; pushes the remainder base d.

    ``(x, S) -> (x', S')`` is a bijection, ``|x' - x n / d| < 1``, and S grows by
    ``log2(d / n)`` bits. ``x n`` is formed in two parts (``x = a d + b``) so that nothing
    exceeds 2^63 (``d <= 2^31``); ``d = 2^31`` takes a faster path.
    """
    if not (isinstance(d, int) and d == DENOMINATOR):
        e = info.pop(n)
        a = torch.div(x, d, rounding_mode="floor")
        t = (x - a * d) * n + e  # x n + e = a n d + t, 0 <= t < n d + n
        q = torch.div(t, d, rounding_mode="floor")
        info.push(t - q * d, d)
        return a * n + q
    e = info.pop(n)
    low = (x & LOW_MASK) * n + e
    info.push(low & LOW_MASK, DENOMINATOR)
    return (x >> DENOMINATOR_BITS) * n + (low >> DENOMINATOR_BITS)


def scale_up(x: Tensor, n: Tensor, info: InfoBuffer, d: Tensor | int = DENOMINATOR) -> Tensor:
    """The inverse of :func:`scale_down`: ``y = x d + pop(base d)``, ``x, e = divmod(y, n)``."""
    if not (isinstance(d, int) and d == DENOMINATOR):
        r = info.pop(d)
        a = torch.div(x, n, rounding_mode="floor")
        z = (x - a * n) * d + r  # y = a n d + z with 0 <= z < n d
        q = torch.div(z, n, rounding_mode="floor")
        info.push(z - q * n, n)
        return a * d + q
    r = info.pop(DENOMINATOR)
    a = torch.div(x, n, rounding_mode="floor")
    z = ((x - a * n) << DENOMINATOR_BITS) + r  # y = a n D + z with 0 <= z < n D
    q = torch.div(z, n, rounding_mode="floor")
    info.push(z - q * n, n)
    return (a << DENOMINATOR_BITS) + q


class FixedPoint:
    """Conversions between float dicts and one flat int64 vector ``round(x * 2^R)``."""

    def __init__(self, problem: Problem, fraction_bits: int):
        self.shapes = {k: v.shape for k, v in problem.params.items()}
        self.dtype, self.bits = problem.dtype, fraction_bits
        self.limit = 2.0 ** (62 - fraction_bits)

    def to_int(self, x: Tensor, what: str, step: int) -> Tensor:
        x = x.to(torch.float64)
        biggest = float(x.abs().max())
        if not math.isfinite(biggest):
            raise NonFiniteError(
                f"reversible: inner training diverged at step {step} ({what} {biggest}); "
                "lower the learning rate or the number of steps"
            )
        if not biggest < self.limit:
            raise self.out_of_range(what, biggest, step)
        return torch.round(x * 2.0**self.bits).to(torch.int64)

    def check_range(self, V: Tensor, P: Tensor, step: int) -> None:
        """Raise if the integer velocity ``V`` or parameters ``P`` reach ``2^62`` (the range
        ``+-2^(62-R)``): below it, adding an increment or a step, each also below it, cannot
        wrap around int64."""
        bound = 1 << 62
        if bool((V.abs().max() >= bound) | (P.abs().max() >= bound)):
            for X, what in ((V, "the velocity"), (P, "the parameters")):
                biggest = float(X.abs().max()) * 2.0**-self.bits
                if not biggest < self.limit:
                    raise self.out_of_range(what, biggest, step)

    def out_of_range(self, what: str, biggest: float, step: int) -> NonFiniteError:
        """The error for ``what`` outside the range; the velocity (a sum of gradients) does
        not shrink with the learning rate, the parameters do."""
        remedy = ("the train loss's scale" if "velocity" in what else "the learning rate")
        return NonFiniteError(
            f"reversible: {what} must stay within the fixed-point range +-{self.limit:g} "
            f"(got {biggest:g} at step {step}); lower fraction_bits or {remedy}"
        )

    def to_float(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return (x.to(torch.float64) * 2.0**-self.bits).to(dtype or self.dtype)

    def leaves(self, x: Tensor) -> dict[str, Tensor]:
        """The float view of ``x`` as a dict of fresh leaves that require grad."""
        parts = torch.split(self.to_float(x), [s.numel() for s in self.shapes.values()])
        return {
            k: v.view(s).requires_grad_()
            for (k, s), v in zip(self.shapes.items(), parts, strict=True)
        }


def flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.detach().reshape(-1) for v in d.values()])


class Coefficients:
    """lr, momentum and weight decay of step t as flat float64 vectors (cached if static)."""

    def __init__(self, problem: Problem, hview: HParamView):
        self.problem, self.hview = problem, hview
        self.cache: dict[str, Any] = {}  # per-name coefficients; "n": (mu, (n, d))
        self.momentum_rounding = 0.0  # max |mu - n / d| seen

    def __call__(self, name: str, step: int) -> Tensor:
        coef = self.problem.optimizer.coefficients[name]
        static = isinstance(coef, (int, float)) or (
            isinstance(coef, str) and self.problem.hparams[coef].kind != "per_step"
        )
        if static and name in self.cache:
            return self.cache[name]
        parts = []
        for k, p in self.problem.params.items():
            v = resolve(coef, self.hview, step, k)
            v = torch.as_tensor(v, dtype=torch.float64, device=p.device).detach()
            parts.append(v.expand(p.shape).reshape(-1))
        value = torch.cat(parts)
        if static:
            self.cache[name] = value
        return value

    def fraction(self, step: int) -> tuple[Tensor, Tensor]:
        """``(n, d)``: the closest fraction ``n / d`` to ``mu_t`` with ``d <= 2^31`` (per
        element), checked to represent a momentum in (0, 1]."""
        mu = self("momentum", step)
        if self.cache.get("n", (None,))[0] is mu:
            return self.cache["n"][1]
        ok = (mu > 0) & (mu <= 1)
        if not bool(ok.all()):
            raise HyperdiffError(
                f"reversible: {self._momentum()} must be in (0, 1] at every step (got "
                f"{self._offending(mu, ~ok)} at step {step})"
            )
        n, d = fraction_of(mu)
        if not bool((n >= 1).all()):
            raise HyperdiffError(
                f"reversible: {self._momentum()} must be at least 2^-31 at every step (got "
                f"{self._offending(mu, n < 1)} at step {step})"
            )
        self.cache["n"] = (mu, (n, d))
        rounding = float((mu - n.to(torch.float64) / d.to(torch.float64)).abs().max())
        self.momentum_rounding = max(self.momentum_rounding, rounding)
        return n, d

    def _momentum(self) -> str:
        """The sgd momentum, named with the hyperparameter that gives it, if one does."""
        coef = self.problem.optimizer.coefficients["momentum"]
        return f"the sgd momentum (hyperparameter {coef!r})" if isinstance(coef, str) else (
            "the sgd momentum")

    def _offending(self, values: Tensor, bad: Tensor) -> str:
        """The first distinct values of the flat ``values`` where ``bad`` (at most three),
        and the parameter of the first."""
        shown = list(dict.fromkeys(values[bad][:1000].tolist()))[:3]
        text = (f"{shown[0]:.12g}" if len(shown) == 1 else
                str([float(f"{v:.12g}") for v in shown]))
        if bool((values == values[0]).all()):  # one value for all parameters
            return text
        where = int(bad.nonzero()[0, 0])
        for name, param in self.problem.params.items():
            if where < param.numel():
                return f"{text}, first for parameter {name!r},"
            where -= param.numel()
        return text


def fraction_of(mu: Tensor) -> tuple[Tensor, Tensor]:
    """Numerators and denominators of the best rational approximations ``n / d`` of ``mu``
    with ``d <= 2^31`` (:meth:`fractions.Fraction.limit_denominator`, once per distinct
    value): 0.9 is 9 / 10 exactly, a typical float64 ``mu`` is matched to about ``2^-62``,
    one a hair away from a fraction with a small denominator gets it (0.5 + 2^-40: 1 / 2)."""
    values, inverse = torch.unique(mu.detach().double().cpu(), return_inverse=True)
    parts = [Fraction(float(v)).limit_denominator(DENOMINATOR) for v in values.tolist()]
    # built on the host from Python ints (as values were read), then moved to mu's device
    n = torch.tensor([p.numerator for p in parts], dtype=torch.int64, device="cpu")[inverse]
    d = torch.tensor([p.denominator for p in parts], dtype=torch.int64, device="cpu")[inverse]
    return n.to(mu.device), d.to(mu.device)


def quantised(mu: Tensor | float) -> Tensor | float:
    """``n / d`` of :func:`fraction_of`: the momentum the integer arithmetic applies. For a
    tensor, the value is ``n / d`` and the derivative that of ``mu`` (straight through), so that
    the backward pass differentiates the step that the forward pass took."""
    if not isinstance(mu, Tensor):
        return float(Fraction(float(mu)).limit_denominator(DENOMINATOR))
    n, d = fraction_of(mu)
    exact = n.to(torch.float64) / d.to(torch.float64)
    return mu + (exact.to(mu.dtype) - mu).detach()


def quantised_optimizer(optimizer: Optimizer, gain: float) -> Optimizer:
    """The heavy-ball ``optimizer`` with its momentum replaced by :func:`quantised` values
    (``gain = 1 - dampening``)."""
    coefs = optimizer.coefficients
    momentum = coefs["momentum"]
    last: list[Any] = [None, None]  # (mu, quantised(mu)) of the previous call

    def rounded(hparams: HParamView, step: int, param: str) -> Tensor | float:
        mu = resolve(momentum, hparams, step, param)
        if last[0] is not mu:  # a momentum shared by all tensors (or constant): rounded once
            last[0], last[1] = mu, quantised(mu)
        return last[1]

    return sgd(coefs["lr"], rounded, dampening=1.0 - gain, weight_decay=coefs["weight_decay"])


def _check_problem(problem: Problem, coefficients: Coefficients) -> float:
    """Refuse what cannot be reversed; return the velocity gain ``1 - dampening``."""
    opt = problem.optimizer
    checkpointed = option("checkpointed()", 'method.name = "checkpointed"')
    if opt.name != "sgd":
        raise HyperdiffError(
            f"reversible: the optimizer must be hd.sgd with momentum (got {opt.name}); use "
            f"{checkpointed} for a memory-saving exact method with other optimizers"
        )
    momentum = opt.coefficients["momentum"]
    if isinstance(momentum, (int, float)) and momentum == 0:
        raise HyperdiffError(
            "reversible: the sgd momentum must be non-zero, plain SGD is not reversible (got 0)"
        )
    if problem.buffers:
        raise HyperdiffError(
            "reversible: the model must have no buffers (got BatchNorm running statistics "
            f"{sorted(problem.buffers)}); use {checkpointed}"
        )
    nesterov = "reversible: the sgd optimizer must use heavy-ball momentum (got nesterov=True)"
    if opt.settings.get("nesterov", False):  # the probe below cannot tell where lr_1 = 0
        raise HyperdiffError(nesterov)
    # probe the update at params 0, grads 1, v = 0: v' = 1 - dampening at step 1, and
    # theta' = -lr v' for heavy ball but -lr (1 + mu) v' for Nesterov
    step = min(1, problem.steps - 1)
    zeros = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in problem.params.items()}
    ones = {k: torch.ones_like(v) for k, v in zeros.items()}
    with torch.no_grad():
        new, state = opt.update(ones, SGDState(zeros), zeros, coefficients.hview, step)
    velocity = flat(state.momentum)
    if not torch.allclose(flat(new), -coefficients("lr", step) * velocity, rtol=1e-12, atol=0):
        raise HyperdiffError(nesterov)
    coefficients.fraction(step)
    return float(velocity[0]) if step == 1 else 1.0


def _gradient(problem: Problem, theta: dict[str, Tensor], hview: HParamView, step: int):
    """``grad L_train(theta_t)`` with its graph: the same call in both passes, so that the
    backward pass sees the forward pass's gradients bit for bit."""
    batch = problem.train_data.batch(step, problem.seed)
    ctx = StepContext(step=step, seed=problem.seed, train=True, buffers={})
    loss = call_loss(problem, "train_loss", theta, hview, batch, ctx)
    return grads_of(loss, theta, create_graph=True), loss.detach()


def _increment(coefficients: Coefficients, fixed: FixedPoint, gain: float, theta, grads,
               step: int) -> Tensor:
    """``round(c_t (g_t + wd_t theta_t) 2^R)``, the exact velocity increment of step t."""
    d = flat(grads).to(torch.float64)
    if coefficients.problem.optimizer.coefficients["weight_decay"] != 0:
        d = d + coefficients("weight_decay", step) * flat(theta).to(torch.float64)
    return fixed.to_int(d if step == 0 else gain * d, "the velocity increment", step)


def _displacement(coefficients: Coefficients, fixed: FixedPoint, V: Tensor, step: int) -> Tensor:
    """``round(lr_t v_t 2^R)``, the exact parameter step."""
    v = fixed.to_float(V, torch.float64)
    return fixed.to_int(coefficients("lr", step) * v, "the parameter step", step)


class Reversal(NamedTuple):
    """What :func:`reverse_steps` returns: the parameters and velocity at ``stop`` (float
    leaves), the validation loss, the raw hypergradient (one tensor per raw value), the
    adjoint of the start's parameters, the train losses and the information buffer's peak."""

    params: dict[str, Tensor]
    velocity: dict[str, Tensor]
    value: Tensor
    grad: list[Tensor]
    adjoint: list[Tensor]
    losses: Tensor
    info_bytes: int
    info_bits: int


def reverse_steps(problem: Problem, raw: dict[str, Tensor], coefficients: Coefficients,
                  gain: float, fixed: FixedPoint, params: dict[str, Tensor],
                  velocity: Tensor | None, start: int, stop: int) -> Reversal:
    """Train steps ``start .. stop-1`` in exact integers from ``params`` and the velocity
    ``v_{start-1}`` (flat; ``None`` at step 0, where there is none), then run them backwards
    to ``start`` accumulating the hypergradient of ``problem``'s validation loss (module doc);
    ``gain = 1 - dampening`` from :func:`_check_problem`.

    Raises:
        NonFiniteError: the backward pass did not end exactly at the start (the train loss is
            not a function of (step, seed)).
    """
    step_optimizer = quantised_optimizer(problem.optimizer, gain)
    P = fixed.to_int(flat(params), "the initial parameters", start)
    V = torch.zeros_like(P) if velocity is None else fixed.to_int(velocity, "the velocity",
                                                                    start)
    P_start, V_start = P.clone(), V.clone()
    info = InfoBuffer(P.numel(), P.device)

    losses = []
    for t in range(start, stop):  # forward: exact integer training, nothing stored
        theta = fixed.leaves(P)
        grads, loss = _gradient(problem, theta, coefficients.hview, t)
        losses.append(loss)
        try:
            increment = _increment(coefficients, fixed, gain, theta, grads, t)
        except NonFiniteError:  # a loss that is not finite says so, as other methods do
            check_finite_losses(torch.stack(losses), "reversible", start)
            raise
        if t > 0:
            n, d = coefficients.fraction(t)
            V = scale_down(V, n, info, d)
        V = V + increment
        P = P - _displacement(coefficients, fixed, V, t)
        fixed.check_range(V, P, t)  # a sum of increments in range may leave it
    losses_t = torch.stack(losses)
    check_finite_losses(losses_t, "reversible", start)
    info_bytes = info.nbytes

    theta_stop, velocity_stop = fixed.leaves(P), fixed.leaves(V)
    leaves = {n: v.clone().requires_grad_() for n, v in raw.items()}
    value = validation_loss(problem, theta_stop, {}, problem.hparams.view(leaves))
    inputs = list(theta_stop.values()) + list(leaves.values())
    grads = zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True), inputs)
    adjoint = grads[: len(theta_stop)] + [torch.zeros_like(g) for g in grads[: len(theta_stop)]]
    grad_raw = grads[len(theta_stop) :]

    for t in range(stop - 1, start - 1, -1):  # backward: undo step t, then one vjp
        P = P + _displacement(coefficients, fixed, V, t)
        theta = fixed.leaves(P)
        leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
        hview = problem.hparams.view(leaves)
        grads, _ = _gradient(problem, theta, hview, t)
        V = V - _increment(coefficients, fixed, gain, theta, grads, t)
        if t > 0:
            n, d = coefficients.fraction(t)
            V = scale_up(V, n, info, d)
        velocity_t = fixed.leaves(V)
        new_theta, new_state = step_optimizer.update(grads, SGDState(velocity_t), theta, hview, t)
        outputs = list(new_theta.values()) + list(new_state.momentum.values())
        inputs = list(theta.values()) + list(velocity_t.values()) + list(leaves.values())
        vjp = zeros_for_unused(
            torch.autograd.grad(outputs, inputs, adjoint, allow_unused=True), inputs
        )
        adjoint = vjp[: len(outputs)]
        grad_raw = [g + v for g, v in zip(grad_raw, vjp[len(outputs) :], strict=True)]

    error = int((P - P_start).abs().max()) + int((V - V_start).abs().max()) + len(info.limbs)
    if error:
        raise NonFiniteError(
            "reversible: the backward pass must retrace the forward pass exactly (got an "
            f"integer mismatch of {error}); the train loss must be deterministic in (step, seed)"
        )
    return Reversal(theta_stop, velocity_stop, value, grad_raw, adjoint[: len(theta_stop)],
                    losses_t, info_bytes, info.peak_limbs * DENOMINATOR_BITS)


def _reversible(problem: Problem, raw: dict[str, Tensor], fraction_bits: int) -> HyperGradient:
    """The steps ``[0, T)`` from theta_0, plus ``a_0`` for an initialization hyperparameter."""
    started = time.perf_counter()
    raw = {n: v.detach() for n, v in raw.items()}
    coefficients = Coefficients(problem, problem.hparams.view(raw))
    gain = _check_problem(problem, coefficients)
    start = initial_state(problem, coefficients.hview, differentiable=False).params
    out = reverse_steps(problem, raw, coefficients, gain, FixedPoint(problem, fraction_bits),
                        start, None, 0, problem.steps)
    grad_raw = out.grad
    if problem.initialization is not None:  # theta_0 = u (rounded to 2^-R): g += a_0
        adjoint_theta = dict(zip(start, out.adjoint, strict=True))
        grad_raw = [g + v for g, v in zip(grad_raw, initial_vjp(problem, raw, adjoint_theta),
                                          strict=True)]
    return finish(
        problem, raw, method="reversible", value=out.value,
        grad=dict(zip(raw, grad_raw, strict=True)), params=out.params, buffers={},
        train_losses=out.losses, started=started, info_bytes=out.info_bytes,
        info_bits_per_element=out.info_bits, fraction_bits=fraction_bits,
        momentum_rounding=coefficients.momentum_rounding,
    )


def reversible_segment(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                       stop: int, val_batches: list[Batch], carry: Any = None, *,
                       fraction_bits: int = 44) -> Segment:
    """Steps ``start .. stop-1`` from ``state`` (its parameters and the velocity ``v_{start-1}``
    of its optimizer state, rounded to the grid ``2^-R``) in exact integers, run backwards to
    ``start`` and checked to end there exactly; the state at ``stop`` is the integer training's
    (``state``'s dtypes), the hypergradient that of the validation loss at ``val_batches``."""
    raw = {n: v.detach() for n, v in raw.items()}
    problem = at_val_batches(problem, val_batches)
    coefficients = Coefficients(problem, problem.hparams.view(raw))
    gain = _check_problem(problem, coefficients)
    velocity = None if start == 0 else flat(state.opt_state.momentum)
    out = reverse_steps(problem, raw, coefficients, gain, FixedPoint(problem, fraction_bits),
                        state.params, velocity, start, stop)
    params = {k: out.params[k].detach().to(v.dtype) for k, v in state.params.items()}
    momentum = {k: out.velocity[k].detach().to(v.dtype)
                for k, v in state.opt_state.momentum.items()}
    return Segment(TrainState(params, dict(state.buffers), SGDState(momentum)),
                   dict(zip(raw, out.grad, strict=True)), float(out.value.detach()), out.losses,
                   diagnostics={"info_bytes": out.info_bytes,
                                "momentum_rounding": coefficients.momentum_rounding})


def reversible(fraction_bits: int = 44) -> Method:
    """Exact-arithmetic reversible SGD with momentum (memory nearly independent of T).

    Args:
        fraction_bits: R, the fixed-point resolution ``2^-R`` of parameters and velocities;
            their range is ``+-2^(62-R)``. The default 44 gives ``5.7e-14`` and ``+-2.6e5``.

    Raises:
        HyperdiffError: bad ``fraction_bits``; at call time, an optimizer other than heavy-ball
            ``hd.sgd`` with momentum in (0, 1], or a model with buffers.
        NonFiniteError: a value leaves the fixed-point range, or the loss is not deterministic.
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
        capabilities=CAPABILITIES,
        segment_fn=partial(reversible_segment, fraction_bits=fraction_bits),
    )
