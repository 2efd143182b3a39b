"""Central finite differences, coordinate by coordinate: a reference, and a baseline.

``dL/du_i ~ (L(u + h_i e_i) - L(u - h_i e_i)) / (2 h_i)`` with ``h_i = eps * max(1, |u_i|)``
on the raw values; 2k full trainings for k coordinates. The default ``eps`` is the cube root
of the dtype's machine epsilon (6e-6 in float64, 5e-3 in float32), which balances truncation
and rounding error for smooth problems.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import check_finite_losses, train, validation_loss
from hyperdiff.errors import HyperdiffError, describe, positive_float
from hyperdiff.methods.base import Capabilities, HyperGradient, Method, finish
from hyperdiff.wording import option

CAPABILITIES = Capabilities(exact=False, offline=True, data_parallel=True)
"""Offline only: it retrains the whole run per coordinate."""


class CostWarning(UserWarning):
    """An expensive method was chosen (finite differences over many coordinates)."""


def evaluate(problem: Problem, raw: dict[str, Tensor]):
    """Train at ``raw`` and return (validation loss, final state, train losses)."""
    state, losses = train(problem, raw)
    check_finite_losses(losses, "finite_difference")
    with torch.no_grad():
        value = validation_loss(problem, state.params, state.buffers, problem.hparams.view(raw))
    return value, state, losses


def _finite_difference(
    problem: Problem, raw: dict[str, Tensor], eps: float | None,
    coordinates: Sequence[int] | None, warn: bool,
) -> HyperGradient:
    started = time.perf_counter()
    hp = problem.hparams
    k = hp.numel
    coords = list(range(k)) if coordinates is None else list(coordinates)
    for i in coords:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < k:
            raise HyperdiffError(
                f"finite_difference: coordinates must be ints in [0, {k}) (got {describe(i)})"
            )
    if warn:
        exact = option("reverse() or forward()", 'method.name = "reverse" or "forward"')
        warnings.warn(
            f"finite_difference: {len(coords)} coordinates cost {2 * len(coords)} trainings of "
            f"{problem.steps} steps; use {exact} for real work",
            CostWarning,
            stacklevel=3,
        )
    base = hp.flatten(raw)
    h = eps if eps is not None else torch.finfo(problem.dtype).eps ** (1 / 3)
    value, state, losses = evaluate(problem, raw)
    flat_grad = torch.full_like(base, float("nan"))
    for i in coords:
        step = h * max(1.0, abs(float(base[i])))
        plus, minus = base.clone(), base.clone()
        plus[i] += step
        minus[i] -= step
        f_plus = evaluate(problem, hp.unflatten(plus))[0]
        f_minus = evaluate(problem, hp.unflatten(minus))[0]
        flat_grad[i] = (f_plus - f_minus) / (2 * step)
    grad = hp.unflatten(flat_grad)
    return finish(
        problem, raw, method="finite_difference", value=value, grad=grad, params=state.params,
        buffers=state.buffers, train_losses=losses, started=started,
        computed=None if coordinates is None else coords, eps=h, coordinates=coords,
    )


def finite_difference(
    eps: float | None = None, coordinates: Sequence[int] | None = None, *, warn: bool = True
) -> Method:
    """Central differences on the raw values (2 trainings per coordinate).

    Args:
        eps: relative step (default: cube root of the dtype's machine epsilon).
        coordinates: flat coordinates to difference (default: all); the others are NaN in the
            result, and ``diagnostics["coordinates"]`` lists those computed.
        warn: emit a :class:`CostWarning` about the cost.
    """
    if eps is not None:
        eps = positive_float("finite_difference", "eps", eps)
    return Method(
        "finite_difference",
        lambda problem, raw: _finite_difference(problem, raw, eps, coordinates, warn),
        {"eps": eps} | ({"coordinates": list(coordinates)} if coordinates is not None else {}),
        capabilities=CAPABILITIES,
    )
