"""Differentiable inner optimizers as pure ``init`` / ``update`` functions over dicts.

Each optimizer follows the update rule of its ``torch.optim`` namesake exactly (same operation
order, bias correction in Python floats as torch does, so constant-coefficient runs match torch
bit for bit), but returns new tensors instead of mutating, so autograd and ``torch.func`` can
differentiate the whole training run with respect to the coefficients.

A coefficient (learning rate, momentum, betas, eps, weight decay) is one of

- a number: a constant;
- a string: the name of a hyperparameter; ``per_step`` hyperparameters are read at the current
  step (a schedule), ``per_tensor`` / ``per_element`` ones at the current parameter;
- a callable ``(hparams, step, param_name) -> Tensor | float`` for anything else, e.g.
  ``lambda h, t, _: h["lr"] * 0.5 * (1 + math.cos(math.pi * t / T))``.

bf16 / fp16 parameters are updated in float32 (:func:`working_dtype`) and rounded back.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.errors import (
    NONNEGATIVE,
    POSITIVE,
    UNIT,
    UNIT_OPEN_HIGH,
    HyperdiffError,
    NonFiniteError,
    Range,
    as_float,
    describe,
    number,
)
from hyperdiff.hparams.constraints import natural_range
from hyperdiff.hparams.hyperparams import HParamView, HyperParameters
from hyperdiff.hparams.schedules import Schedule, field_range
from hyperdiff.logs import get_logger
from hyperdiff.typing import Params

Coefficient = float | str | Callable[[HParamView, int, str], Any]


class Optimizer(NamedTuple):
    """A pure optimizer: ``state = init(params)``, then per step
    ``new_params, state = update(grads, state, params, hparams, step)``."""

    name: str
    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params, HParamView, int], tuple[Params, Any]]
    coefficients: Mapping[str, Coefficient]
    settings: Mapping[str, Any] = {}
    """Fixed, non-differentiable options (``nesterov``, ``dampening``), for export."""
    valid: Mapping[str, Range] = {}  # valid values of each number coefficient (read only)


class SGDState(NamedTuple):
    momentum: dict[str, Tensor]


class AdamState(NamedTuple):
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]


class CoefficientRangeError(NonFiniteError):
    """Hyperparameter values at which an optimizer coefficient is invalid (an ``adam`` beta2
    of 1.5, a negative learning rate): training there would diverge or be meaningless. A
    :class:`~hyperdiff.errors.NonFiniteError`, so that an outer loop's divergence guard takes
    a step that moved a value there as a failed step, as it would the diverged training."""


def resolve(coef: Coefficient, hparams: HParamView, step: int, param: str) -> Tensor | float:
    """Value of a coefficient at ``step`` for parameter ``param``."""
    if isinstance(coef, str):
        return hparams.at(coef, step=step, param=param)
    if callable(coef):
        return coef(hparams, step, param)
    return coef


def _checked_callable(coef: Coefficient, caller: str, label: str, valid: Range) -> Coefficient:
    """``coef``; a callable one (not a schedule) wrapped to refuse a number it returns outside
    ``valid`` at any step. A tensor it returns is not checked here (that would cost a device
    sync per step): :func:`check_callables` checks those over all steps when the problem is
    made."""
    if isinstance(coef, (str, Schedule)) or not callable(coef):
        return coef
    function = coef

    def checked(hparams: HParamView, step: int, param: str) -> Any:
        value = function(hparams, step, param)
        if isinstance(value, numbers.Real) and not valid.contains(value):
            raise _callable_error(caller, label, valid, value, step, param)
        return value

    return checked


def _callable_error(caller: str, label: str, valid: Range, value: Any, step: int,
                    param: str) -> HyperdiffError:
    return HyperdiffError(
        f"{caller}: {label}, a callable, must give {valid.text()} at every step (got "
        f"{_shown(value)} at step {step} for parameter {param!r})")


def _shown(value: Any) -> str:
    """A number or list of numbers to 12 digits (``-0.1``, not ``-0.10000000000000003``)."""
    if isinstance(value, list):
        return str([float(f"{v:.12g}") for v in value])
    if isinstance(value, numbers.Real) and math.isfinite(as_float(value)):
        return str(float(f"{float(value):.12g}"))
    return describe(value)  # also an int too large for a float, which it abbreviates


def _is_zero(coef: Coefficient) -> bool:
    return isinstance(coef, (int, float)) and not isinstance(coef, bool) and coef == 0


def _add_scaled(a: Tensor, b: Tensor, coef: Tensor | float) -> Tensor:
    """``a + coef * b``, fused as torch.optim does when ``coef`` is a number."""
    if isinstance(coef, Tensor):
        return a + coef * b
    return torch.add(a, b, alpha=coef)


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose derivative at ``x = 0`` is 0 instead of inf.

    Adam's second moment is exactly 0 where a gradient coordinate has always been 0; the plain
    square root then gives ``0 * inf = NaN`` in every derivative. The true derivative there is 0
    (the moment does not move to first order), which the double ``where`` produces in both
    reverse and forward mode.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def working_dtype(param: Tensor) -> torch.dtype:
    """The dtype an update of ``param`` is computed in: its own, at least float32.

    A bf16 / fp16 parameter is updated in float32 (its optimizer state too) and the new value
    rounded back once, so a learning rate of 0.05 acts as 0.05 and not as its bf16 rounding;
    for float32 and float64 parameters nothing changes (``.to`` of the same dtype is a no-op).
    """
    return torch.promote_types(param.dtype, torch.float32)


SGD_VALID = {"lr": NONNEGATIVE, "momentum": NONNEGATIVE, "dampening": UNIT,
             "weight_decay": NONNEGATIVE}
"""Valid values of SGD's coefficients (``torch.optim.SGD`` refuses the same)."""

ADAM_VALID = {"lr": NONNEGATIVE, "beta1": UNIT_OPEN_HIGH, "beta2": UNIT_OPEN_HIGH,
              "eps": POSITIVE, "weight_decay": NONNEGATIVE}
"""Valid values of Adam's and AdamW's coefficients (as ``torch.optim.Adam``; eps > 0)."""


def plain_numbers(coefs: dict[str, Coefficient]) -> dict[str, Coefficient]:
    """``coefs`` with NumPy (and other non-builtin) real scalars as Python floats, as
    ``torch.optim`` takes them (``np.float32(0.1)`` is neither an int nor a float)."""
    return {name: float(c) if isinstance(c, numbers.Real)  # NumPy's bool_ is not one
            and not isinstance(c, (bool, int, float)) else c for name, c in coefs.items()}


def _check_coefficient(caller: str, name: str, coef: Coefficient, valid: Range) -> None:
    if isinstance(coef, bool) or (not isinstance(coef, (int, float, str)) and not callable(coef)):
        raise HyperdiffError(
            f"{caller}: {name} must be {valid.text('a number')}, a hyperparameter name or a "
            f"callable (got {describe(coef)})"
        )
    if isinstance(coef, (int, float)) and not valid.contains(coef):  # 10**400 too
        raise HyperdiffError(f"{caller}: {name} must be {valid.text()} (got {describe(coef)})")
    if isinstance(coef, str) and not coef:
        raise HyperdiffError(f"{caller}: {name} must be a hyperparameter name (got '')")


def sgd(
    lr: Coefficient,
    momentum: Coefficient = 0.0,
    *,
    nesterov: bool = False,
    dampening: float = 0.0,
    weight_decay: Coefficient = 0.0,
) -> Optimizer:
    """SGD with optional heavy-ball or Nesterov momentum, as ``torch.optim.SGD``.

    ``d = g + wd * p``; ``b_0 = d``, ``b_t = mu * b_{t-1} + (1 - dampening) * d``;
    ``d <- d + mu * b_t`` (Nesterov) or ``d <- b_t``; ``p <- p - lr * d``.
    """
    coefs = plain_numbers({"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
    for name, coef in coefs.items():
        _check_coefficient("sgd", name, coef, SGD_VALID[name])
    lr, momentum, weight_decay = (_checked_callable(coefs[k], "sgd", k, SGD_VALID[k])
                                  for k in ("lr", "momentum", "weight_decay"))
    dampening = number("sgd", "dampening", dampening, SGD_VALID["dampening"])  # fixed, a float
    if not isinstance(nesterov, bool):
        raise HyperdiffError(f"sgd: nesterov must be True or False (got {describe(nesterov)})")
    use_momentum = not _is_zero(momentum)
    if nesterov and not use_momentum:
        raise HyperdiffError("sgd: nesterov=True needs a non-zero momentum (got momentum=0)")
    if nesterov and dampening != 0:
        raise HyperdiffError(f"sgd: nesterov=True needs dampening=0 (got {dampening})")

    def init(params: Params) -> SGDState:
        if not use_momentum:
            return SGDState({})
        return SGDState(
            {k: torch.zeros_like(p, dtype=working_dtype(p)) for k, p in params.items()}
        )

    def update(grads: Params, state: SGDState, params: Params, hparams: HParamView, step: int):
        new_params, new_buf = {}, {}
        for k, param in params.items():
            p = param.to(working_dtype(param))
            d = grads[k].to(p.dtype)
            if not _is_zero(weight_decay):
                d = _add_scaled(d, p, resolve(weight_decay, hparams, step, k))
            if use_momentum:
                mu = resolve(momentum, hparams, step, k)
                if step == 0:
                    buf = d
                else:
                    buf = _add_scaled(state.momentum[k] * mu, d, 1.0 - dampening)
                new_buf[k] = buf
                d = _add_scaled(d, buf, mu) if nesterov else buf
            lr_k = resolve(lr, hparams, step, k)
            # p - lr * d: p + (-lr) * d to rounding (torch.add(alpha=) may fuse a
            # multiply-add), one kernel fewer for a tensor lr
            if isinstance(lr_k, Tensor):
                new_params[k] = (p - lr_k * d).to(param.dtype)
            else:
                new_params[k] = torch.add(p, d, alpha=-lr_k).to(param.dtype)
        return new_params, SGDState(new_buf)

    return Optimizer("sgd", init, update, coefs,
                     settings={"nesterov": nesterov, "dampening": dampening}, valid=SGD_VALID)


def adam(
    lr: Coefficient = 1e-3,
    betas: tuple[Coefficient, Coefficient] = (0.9, 0.999),
    eps: Coefficient = 1e-8,
    *,
    weight_decay: Coefficient = 0.0,
    decoupled: bool = False,
) -> Optimizer:
    """Adam as ``torch.optim.Adam`` (``decoupled=True``: AdamW's weight decay).

    ``g <- g + wd * p`` (or ``p <- p * (1 - lr * wd)`` when decoupled);
    ``m <- lerp(m, g, 1 - b1)``; ``v <- b2 * v + (1 - b2) * g^2``;
    ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` with ``t = step + 1``.
    """
    if not isinstance(decoupled, bool):  # first: it names the caller of the errors below
        raise HyperdiffError(f"adam: decoupled must be True or False (got {describe(decoupled)})")
    caller = "adamw" if decoupled else "adam"
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise HyperdiffError(
            f"{caller}: betas must be a pair (beta1, beta2) of numbers in [0, 1) "
            f"(got {describe(betas)})"
        )
    beta1, beta2 = betas
    coefs = plain_numbers({"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps,
                           "weight_decay": weight_decay})
    labels = {"beta1": "betas[0]", "beta2": "betas[1]"}
    for name, coef in coefs.items():
        _check_coefficient(caller, labels.get(name, name), coef, ADAM_VALID[name])
    lr, beta1, beta2, eps, weight_decay = (
        _checked_callable(coefs[k], caller, labels.get(k, k), ADAM_VALID[k])
        for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))

    def init(params: Params) -> AdamState:
        return AdamState(
            {k: torch.zeros_like(p, dtype=working_dtype(p)) for k, p in params.items()},
            {k: torch.zeros_like(p, dtype=working_dtype(p)) for k, p in params.items()},
        )

    def update(grads: Params, state: AdamState, params: Params, hparams: HParamView, step: int):
        t = step + 1
        new_params, new_m, new_v = {}, {}, {}
        for k, param in params.items():
            p = param.to(working_dtype(param))
            g = grads[k].to(p.dtype)
            lr_k = resolve(lr, hparams, step, k)
            if not _is_zero(weight_decay):
                wd = resolve(weight_decay, hparams, step, k)
                if decoupled:
                    p = p * (1 - lr_k * wd)
                else:
                    g = _add_scaled(g, p, wd)
            b1 = resolve(beta1, hparams, step, k)
            b2 = resolve(beta2, hparams, step, k)
            m = torch.lerp(state.exp_avg[k], g, 1 - b1)
            if isinstance(b2, Tensor):
                v = state.exp_avg_sq[k] * b2 + (1 - b2) * g * g
            else:
                v = torch.addcmul(state.exp_avg_sq[k] * b2, g, g, value=1 - b2)
            correction1 = 1 - b1**t
            correction2_sqrt = (1 - b2**t) ** 0.5
            denom = safe_sqrt(v) / correction2_sqrt + resolve(eps, hparams, step, k)
            step_size = lr_k / correction1
            if isinstance(step_size, Tensor):
                new_params[k] = (p - step_size * (m / denom)).to(param.dtype)
            else:
                new_params[k] = torch.addcdiv(p, m, denom, value=-step_size).to(param.dtype)
            new_m[k], new_v[k] = m, v
        return new_params, AdamState(new_m, new_v)

    return Optimizer(caller, init, update, coefs, valid=ADAM_VALID)


def adamw(
    lr: Coefficient = 1e-3,
    betas: tuple[Coefficient, Coefficient] = (0.9, 0.999),
    eps: Coefficient = 1e-8,
    *,
    weight_decay: Coefficient = 1e-2,
) -> Optimizer:
    """AdamW as ``torch.optim.AdamW``: Adam with decoupled weight decay."""
    return adam(lr, betas, eps, weight_decay=weight_decay, decoupled=True)


def referenced_hyperparameters(optimizer: Optimizer) -> set[str]:
    """Names of hyperparameters that the optimizer's string coefficients refer to."""
    return {c for c in optimizer.coefficients.values() if isinstance(c, str)}



def check_schedule(optimizer: Optimizer, coef_name: str, schedule: Schedule,
                   hparams: HyperParameters) -> None:
    """A schedule coefficient's fields must be scalar continuous hyperparameters of
    ``hparams`` with values its family is defined for (``peak`` > 0; ``warmup``, ``final``,
    ``gamma`` in (0, 1)), and its values over the run valid for the coefficient; warn when a
    field's constraint lets the outer loop move it out of its range."""
    caller = f"hypergradient: the {schedule.family} schedule of {coef_name}"
    for field_name, name in schedule.names.items():
        spec = hparams.get(name)
        if spec is None or spec.is_discrete or math.prod(spec.shape) != 1:
            got = "no such hyperparameter" if spec is None else f"the {spec.kind} {name!r}"
            raise HyperdiffError(
                f"{caller} must read its {field_name} from a scalar hyperparameter {name!r} "
                f"(got {got}; defined: {list(hparams)}); add schedule.hyperparameters() to the "
                "collection")
        value = float(hparams.natural()[name])
        valid = field_range(field_name)
        if not valid.contains(value):
            raise HyperdiffError(f"{caller}: {name!r} must be {valid.text()} (got {value!r})")
        low, high = natural_range(spec.constraint)
        if (valid.low is not None and (low is None or low < valid.low)) or (
                valid.high is not None and (high is None or high > valid.high)):
            get_logger("problem").warning(
                "%s: %r has a %s constraint that lets tuning move it outside %s; constrain "
                "it as schedule.hyperparameters() does", caller, name, spec.constraint.name,
                valid.text())
    bound = optimizer.valid.get(coef_name)
    values = schedule.window(hparams.natural(), 0, schedule.steps)
    if bound is not None and not bool(bound.tensor_contains(values).all()):
        bad = values[~bound.tensor_contains(values)].reshape(-1)[:3].tolist()
        raise HyperdiffError(f"{caller} must give values that are {bound.text()} at every step "
                             f"(got {bad})")


def check_coefficient_values(
    optimizer: Optimizer, coef_name: str, hparam: str, hparams: HyperParameters,
    dtype: torch.dtype,
) -> None:
    """The current values of a hyperparameter that is an optimizer coefficient must be valid
    for it (``sgd`` momentum >= 0, ``adam`` betas in [0, 1), ...), also in ``dtype``, the one
    training computes them in; warn when its constraint lets the outer loop move it out of
    that range."""
    valid = optimizer.valid.get(coef_name)
    if valid is None:
        return
    values = hparams.natural()[hparam]
    ok = valid.tensor_contains(values)
    if not bool(ok.all()):
        bad = values[~ok].reshape(-1)[:3].tolist()
        raise HyperdiffError(
            f"hypergradient: hyperparameter {hparam!r}, the {optimizer.name} {coef_name}, "
            f"must be {valid.text()} (got {bad})"
        )
    rounded = hparams[hparam].constraint.to_natural(hparams.raw[hparam].to(dtype))
    ok = valid.tensor_contains(rounded)
    if not bool(ok.all()):
        bad = values[~ok].reshape(-1)[:3].tolist()
        near = rounded[~ok].reshape(-1)[:3].tolist()
        raise HyperdiffError(
            f"hypergradient: hyperparameter {hparam!r}, the {optimizer.name} {coef_name}, "
            f"must be {valid.text()} in {str(dtype).removeprefix('torch.')}, the dtype "
            f"training computes it in (got {bad}, which rounds to {near} there); choose a "
            "value farther from the bound, or train in float64"
        )
    low, high = natural_range(hparams[hparam].constraint)
    inside = (valid.low is None or (low is not None and low >= valid.low)) and (
        valid.high is None or (high is not None and high <= valid.high))
    if not inside:
        get_logger("problem").warning(  # the problem's logger, as make_problem's
            "hypergradient: hyperparameter %r, the %s %s, has a %s constraint that lets "
            "tuning move it outside its valid values (%s); constrain it, e.g. "
            "hd.scalar(value, (low, high))",
            hparam, optimizer.name, coef_name, hparams[hparam].constraint.name, valid.text(),
        )

def check_number_coefficients(optimizer: Optimizer, dtype: torch.dtype,
                              caller: str = "hypergradient") -> None:
    """A number coefficient must be finite in ``dtype``, the one training computes it in
    (:func:`working_dtype`): ``hd.sgd(1e39)`` is a valid float64 learning rate that float32
    cannot hold, and torch's ``alpha=`` would fail on it with a bare overflow error.

    What the update computes with must also stay in range when ``dtype`` rounds it: adam's
    ``eps=1e-50`` is 0 in float32, and refused. A number beta is a Python float that the update
    (as ``torch.optim``'s) casts only as ``1 - beta`` (the weight of the new gradient; beta2
    also as the moment's factor, which the rounding keeps in [0, 1]), so betas of 0.99999999,
    which float32 holds as 1.0, train as ``torch.optim.Adam`` does.

    >>> check_number_coefficients(sgd(1e39), torch.float64)  # fine in float64
    >>> check_number_coefficients(sgd(1e39), torch.float32)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    hyperdiff.errors.HyperdiffError: hypergradient: the sgd lr must be finite in float32, ...
    """
    dtype_name = str(dtype).removeprefix("torch.")
    for coef_name, coef in optimizer.coefficients.items():
        if isinstance(coef, bool) or not isinstance(coef, (int, float)):
            continue
        label = _label(optimizer, coef_name)
        one_minus = optimizer.name in ("adam", "adamw") and coef_name in ("beta1", "beta2")
        used = 1 - as_float(coef) if one_minus else as_float(coef)
        held = float(torch.tensor(used, dtype=dtype, device="cpu"))
        valid = ONE_MINUS_BETA if one_minus else optimizer.valid.get(coef_name)
        if math.isfinite(held) and valid is not None and not valid.contains(held):
            if one_minus:  # only below float32: 1 - beta >= 2**-53 for a float64 beta < 1
                raise HyperdiffError(
                    f"{caller}: the {optimizer.name} {label} must leave 1 - {label} > 0 in "
                    f"{dtype_name}, the dtype training computes it in (got {coef!r}, whose "
                    f"1 - {label}, {_shown(used)}, {dtype_name} holds as {held!r}); use a "
                    "smaller value, or train in float64")
            raise HyperdiffError(  # e.g. adam's eps=1e-50, which float32 holds as 0
                f"{caller}: the {optimizer.name} {label} must be "
                f"{valid.text()} in {dtype_name}, the dtype training computes it in (got "
                f"{coef!r}, which {dtype_name} holds as {held!r}); use a value it holds, or "
                "train in float64")
        if math.isfinite(held):
            continue
        raise HyperdiffError(
            f"{caller}: the {optimizer.name} {label} must be finite in "
            f"{dtype_name}, the dtype training computes it in (got {coef!r}, which overflows "
            f"to inf there: {dtype_name} holds at most {torch.finfo(dtype).max:.6g}); use a "
            "smaller value, or train in float64")


ONE_MINUS_BETA = Range(0.0, 1.0, open_low=True)
"""Valid values of ``1 - beta`` as an Adam update computes with it (0 would freeze a moment)."""


def _label(optimizer: Optimizer, coef_name: str) -> str:
    """How the optimizer's own messages name a coefficient (``betas[1]`` for adam's beta2)."""
    return {"beta1": "betas[0]", "beta2": "betas[1]"}.get(coef_name, coef_name)


CALLABLE_CHECK_STEPS = 256
"""The most steps at which :func:`check_callables` evaluates a callable coefficient (evenly
spaced, the first and the last among them): its Python call per step and tensor would cost
seconds at make time for a long run; training checks the numbers it gives at every step."""


def check_callables(optimizer: Optimizer, hparams: HParamView, params: Params,
                    steps: int) -> None:
    """A callable coefficient must give, at ``hparams`` (the start values), a number or a tensor
    valid for its coefficient at the checked steps (every step up to
    :data:`CALLABLE_CHECK_STEPS`, else that many evenly spaced) and for every parameter
    (training checks the numbers it gives again at each step, not the tensors: that would
    sync the device)."""
    for coef_name, coef, valid in _callables(optimizer):
        bad = _first_invalid(optimizer, coef_name, coef, valid, hparams, params, range(steps))
        if bad is not None:
            raise _callable_error(optimizer.name, _label(optimizer, coef_name), valid, *bad)


def _callables(optimizer: Optimizer) -> list[tuple[str, Callable[..., Any], Range]]:
    """The callable coefficients (not schedules) that have a valid range, with it."""
    return [(name, coef, optimizer.valid[name]) for name, coef in optimizer.coefficients.items()
            if callable(coef) and not isinstance(coef, (str, Schedule))
            and name in optimizer.valid]


def _checked_steps(steps: range) -> Sequence[int]:
    """``steps``, or :data:`CALLABLE_CHECK_STEPS` of them evenly spaced (the first and the last
    among them) when there are more."""
    if len(steps) <= CALLABLE_CHECK_STEPS:
        return steps
    return [steps[i] for i in sorted({round(i * (len(steps) - 1) / (CALLABLE_CHECK_STEPS - 1))
                                      for i in range(CALLABLE_CHECK_STEPS)})]


def _first_invalid(optimizer: Optimizer, coef_name: str, coef: Callable[..., Any], valid: Range,
                   hparams: HParamView, params: Params,
                   steps: range) -> tuple[Any, int, str] | None:
    """``(value, step, parameter)`` of the first invalid value the callable ``coef`` gives at
    ``hparams`` over the checked ``steps`` (:func:`_checked_steps`) and every parameter, or
    None; its tensors are checked a thousand at a time on their device (one sync if all are
    valid)."""
    checked = _checked_steps(steps)
    label = _label(optimizer, coef_name)
    ok: Tensor | bool = True  # all tensors valid so far, on their device (no sync)
    pending: list[Tensor] = []  # tensors to check at once: a few kernels per thousand
    with torch.no_grad():
        for step in checked:
            for name, param in params.items():
                value = coef(hparams, step, name)
                if isinstance(value, Tensor):
                    pending.append(value.detach().to(working_dtype(param)).reshape(-1))
                    if len(pending) >= 1024 or pending[-1].numel() > 2**16:
                        ok = valid.tensor_contains(torch.cat(pending)).all() & ok
                        pending.clear()
                elif not isinstance(value, numbers.Real):
                    raise HyperdiffError(
                        f"{optimizer.name}: {label}, a callable, must return a number or a "
                        f"tensor (got {describe(value)} at step {step} for parameter "
                        f"{name!r})")
                elif not valid.contains(value):
                    return value, step, name
        if pending:
            ok = valid.tensor_contains(torch.cat(pending)).all() & ok
        if bool(ok):
            return None
        for step in checked:  # where: the first offending step and parameter
            for name, param in params.items():
                value = coef(hparams, step, name)
                if not isinstance(value, Tensor):
                    continue
                value = value.detach()
                bad = ~valid.tensor_contains(value.to(working_dtype(param)))
                if bool(bad.any()):
                    shown = value[bad].reshape(-1)[:3].tolist()
                    return shown[0] if value.dim() == 0 else shown, step, name
    return None


def check_raw_coefficients(optimizer: Optimizer, hparams: HyperParameters,
                           raw: Mapping[str, Tensor], dtype: torch.dtype, *,
                           params: Params | None = None, steps: int | range | None = None,
                           ) -> None:
    """Raise :class:`CoefficientRangeError` where the raw values ``raw`` (in ``dtype``, the one
    training computes them in) make a coefficient that a hyperparameter or a schedule gives
    invalid for it: once per method call, on the device ``raw`` lives on (the host for a
    collection's own values), so training never sees a beta2 of 1.5 and blames the learning
    rate for the NaN it produces.

    Given the parameters ``params`` and the training's ``steps`` (a count, or the range a
    window trains), a callable coefficient is checked too: called at ``raw`` (on the
    parameters' device) as :func:`check_callables` calls it at the start values, at most
    :data:`CALLABLE_CHECK_STEPS` steps for each parameter, at most as many calls as training
    makes."""
    for coef_name, coef in optimizer.coefficients.items():
        valid = optimizer.valid.get(coef_name)
        if valid is None or not isinstance(coef, (str, Schedule)):
            continue
        names = list(coef.names.values()) if isinstance(coef, Schedule) else [coef]
        natural = {n: hparams[n].constraint.to_natural(raw[n].detach().to(dtype))
                   for n in names}
        what = (f"hyperparameter {coef!r}" if isinstance(coef, str) else
                f"the {coef.family} schedule of {coef_name} (fields {names})")
        if isinstance(coef, Schedule):
            fields = {f: natural[n] for f, n in coef.names.items()}
            for field_name, value in fields.items():
                if not field_range(field_name).contains(float(value)):
                    raise CoefficientRangeError(
                        f"hypergradient: {what}: {coef.names[field_name]!r} must be "
                        f"{field_range(field_name).text()} (got {_shown(float(value))})")
            values = coef.window(natural, 0, coef.steps)
        else:
            values = natural[coef]
        ok = valid.tensor_contains(values)
        if not bool(ok.all()):
            bad = values[~ok].reshape(-1)[:3].tolist()
            shown = _shown(bad[0] if values.dim() == 0 else bad)
            over_steps = isinstance(coef, Schedule) or hparams[coef].kind == "per_step"
            where = (f" from step {int((~ok).reshape(-1).nonzero()[0])}" if over_steps else "")
            raise CoefficientRangeError(
                f"hypergradient: {what}, the {optimizer.name} {coef_name}, must be "
                f"{valid.text()} (got {shown}{where} at the raw values given, in "
                f"{str(dtype).removeprefix('torch.')}); keep it there with its constraint, "
                "e.g. hd.scalar(value, (low, high))")
    if params is None or steps is None:
        return
    view: HParamView | None = None  # made once, and only for a callable coefficient
    for coef_name, coef, valid in _callables(optimizer):
        if view is None:
            device = next(iter(params.values())).device
            view = hparams.view({n: v.detach().to(device=device, dtype=dtype)
                                 for n, v in raw.items()})
        found = _first_invalid(optimizer, coef_name, coef, valid, view, params,
                               range(steps) if isinstance(steps, int) else steps)
        if found is not None:
            value, step, param = found
            raise CoefficientRangeError(
                f"hypergradient: the {optimizer.name} {coef_name}, a callable, must give "
                f"{valid.text()} at every step (got {_shown(value)} at step {step} for "
                f"parameter {param!r} at the raw values given, in "
                f"{str(dtype).removeprefix('torch.')}); keep the hyperparameters it reads "
                "where it is valid with their constraints, e.g. hd.scalar(value, (low, high))")


__all__ = ["AdamState", "CoefficientRangeError", "Optimizer", "SGDState", "adam", "adamw",
           "check_callables", "check_coefficient_values", "check_number_coefficients",
           "check_raw_coefficients", "sgd"]
