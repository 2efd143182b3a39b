"""Outer optimizers that set their own step sizes: sign agreement and a loss-driven radius.

Both step the raw values ``u`` (log units for a positive hyperparameter) with the group's
learning rate ``lr`` (the driver's base lr x guard scale x schedule) as the unit of length.

:class:`SignStep` (Rprop-like, iRprop-minus): per coordinate ``i`` at step ``t``, with
``a = sign(g_t,i) * sign(g_{t-1,i})`` (``g_{t-1} = 0`` at the first step)::

    scale_i <- clip(scale_i * (grow if a > 0, shrink if a < 0, 1 if a == 0), min_scale, max_scale)
    g_t,i   <- 0 if a < 0                       (a flipped sign: no step, and no memory of it)
    u_i     <- u_i - lr * scale_i * sign(g_t,i)

A value keeps moving while its hypergradient keeps its sign, faster each step, up to
``max_scale * lr`` (0.5 log units at the default lr 0.05); on noise (signs agreeing half the
time) ``grow * shrink < 1`` makes the scale shrink.

:class:`TrustAdam`: Adam's step times a radius ``r`` (one per optimizer), with the loss of the
point the step starts from, ``L_t`` (passed as ``step(closure)``, ``closure() -> L_t``)::

    r <- clip(r * (grow if L_t < L_{t-1} else shrink), min_radius, max_radius)   (t > 0)
    u <- Adam(u, g_t) with learning rate lr * r

A step whose loss fell makes the next one longer, one whose loss rose makes it shorter; the
driver passes the selection loss (the validation loss without a selection split).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from hyperdiff.errors import fail, is_number
from hyperdiff.methods.registry import OPTIMIZERS


def _factor(caller: str, name: str, value: Any, low: float, high: float) -> float:
    """``value`` as a float in the open interval (low, high), else the standard error."""
    if not (is_number(value) and low < value < high):
        raise fail(caller, name, f"a number in ({low:g}, {high:g})", value)
    return float(value)


def _bounds(caller: str, name: str, value: Any) -> tuple[float, float]:
    """``value`` as a pair ``0 < low <= 1 <= high < inf``, else the standard error."""
    ok = (isinstance(value, tuple) and len(value) == 2 and all(is_number(v) for v in value)
          and 0 < value[0] <= 1 <= value[1] < math.inf)
    if not ok:
        raise fail(caller, name, "a pair (low, high) with 0 < low <= 1 <= high < inf", value)
    return float(value[0]), float(value[1])


def _lr(caller: str, value: Any) -> float:
    if not (is_number(value) and 0 < value < math.inf):
        raise fail(caller, "lr", "a positive finite number", value)
    return float(value)


class SignStep(torch.optim.Optimizer):
    """Per-coordinate step sizes from the agreement of successive hypergradient signs.

    Args:
        params: the raw-value leaves.
        lr: the unit of length (the first step moves every coordinate by ``lr``).
        grow, shrink: scale factors on an agreeing / flipped sign (``grow > 1 > shrink``).
        scales: ``(min_scale, max_scale)``, the range of the per-coordinate scale.

    >>> u = torch.zeros(2, requires_grad=True)
    >>> opt = SignStep([u], lr=0.1)
    >>> for g in ([1.0, -2.0], [3.0, 1.0]):
    ...     u.grad = torch.tensor(g); opt.step()
    >>> u.detach()
    tensor([-0.2500,  0.1000])
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.05, *, grow: float = 1.5,
                 shrink: float = 0.5, scales: tuple[float, float] = (0.01, 10.0)):
        defaults = {"lr": _lr("SignStep", lr), "grow": _factor("SignStep", "grow", grow, 1, 10),
                    "shrink": _factor("SignStep", "shrink", shrink, 0, 1),
                    "scales": _bounds("SignStep", "scales", scales)}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step on the leaves' ``.grad`` (``closure``: called with gradients enabled and
        its value returned, as torch's optimizers do)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            low, high = group["scales"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["scale"] = torch.ones_like(p)
                    state["prev"] = torch.zeros_like(p)
                sign = p.grad.sign()
                agree = sign * state["prev"]
                factor = torch.ones_like(p)  # in p's dtype: a float32 0.3 is not 0.3
                factor[agree > 0], factor[agree < 0] = group["grow"], group["shrink"]
                state["scale"].mul_(factor).clamp_(low, high)
                sign[agree < 0] = 0.0
                p.add_(-group["lr"] * state["scale"] * sign)
                state["prev"] = sign
        return loss


class TrustAdam(torch.optim.Adam):
    """Adam whose learning rate is multiplied by a radius that grows while the loss falls.

    Args:
        params: the raw-value leaves.
        lr: Adam's learning rate at radius 1.
        grow, shrink: radius factors after a fall / a rise of the loss (``grow > 1 > shrink``).
        radii: ``(min_radius, max_radius)``.
        adam_options: the rest of :class:`torch.optim.Adam`'s (``betas``, ``eps``, ...).

    ``step(closure)`` needs ``closure() -> L_t`` (a float: the loss at the current values);
    without one the radius stays where it is. The radius and the last loss are kept in the
    param group, so :meth:`state_dict` holds them.

    >>> u = torch.zeros(1, requires_grad=True)
    >>> opt = TrustAdam([u], lr=0.1)
    >>> for loss in (2.0, 1.0):
    ...     u.grad = torch.ones(1); _ = opt.step(lambda: loss)
    >>> opt.param_groups[0]["radius"]
    1.5
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.05, *, grow: float = 1.5,
                 shrink: float = 0.5, radii: tuple[float, float] = (0.1, 10.0),
                 **adam_options: Any):
        super().__init__(params, lr=_lr("TrustAdam", lr), **adam_options)
        extra = {"grow": _factor("TrustAdam", "grow", grow, 1, 10),
                 "shrink": _factor("TrustAdam", "shrink", shrink, 0, 1),
                 "radii": _bounds("TrustAdam", "radii", radii)}
        self.defaults.update(extra)  # so that type(opt)(params, **opt.defaults) copies it
        for group in self.param_groups:
            group.update(extra, radius=1.0, last_loss=None)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Update the radius from ``closure()``, then take Adam's step at ``lr * radius``."""
        loss = None if closure is None else closure()
        value = None if loss is None else float(loss)
        for group in self.param_groups:
            last = group["last_loss"]
            if value is not None and math.isfinite(value):
                if last is not None:
                    factor = group["grow"] if value < last else group["shrink"]
                    group["radius"] = min(max(group["radius"] * factor, group["radii"][0]),
                                          group["radii"][1])
                group["last_loss"] = value
            group["base_lr"], group["lr"] = group["lr"], group["lr"] * group["radius"]
        try:
            super().step()
        finally:
            for group in self.param_groups:
                group["lr"] = group.pop("base_lr")
        return loss


OUTER_STEPS: dict[str, type[torch.optim.Optimizer]] = {"signstep": SignStep, "trust": TrustAdam}
"""Outer optimizers of this module, by name (offline only)."""

DEFAULT_OFFLINE = "signstep"
"""The offline default (``HyperOptimizer``'s, and ``outer.optimizer = "auto"`` offline), chosen
by test loss across tasks and starts (``benchmarks/outer_defaults.py``, docs/driver.md)."""


def default_schedule(optimizer: str) -> str:
    """The outer schedule ``"auto"`` means for ``optimizer``: ``"constant"`` for
    ``signstep`` (a flipped sign halves its step, so it anneals itself, and a cosine decay
    would cap its travel: about e-fold in 10 steps; docs/driver.md), else ``"cosine"``."""
    return "constant" if optimizer == "signstep" else "cosine"


def offline_optimizers() -> list[str]:
    """Every name the offline driver accepts: :data:`OPTIMIZERS` (torch.optim) and ours."""
    return [*OPTIMIZERS, *OUTER_STEPS]


def outer_optimizer(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer class called ``name`` (one of :func:`offline_optimizers`), called as
    ``outer_optimizer(name)(leaves, lr=lr)``."""
    if name in OUTER_STEPS:
        return OUTER_STEPS[name]
    return getattr(torch.optim, OPTIMIZERS[name])  # type: ignore[no-any-return]
