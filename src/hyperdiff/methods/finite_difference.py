"""Central finite differences, coordinate by coordinate: a reference, and a baseline.

``dL/du_i ~ (L(u + h_i e_i) - L(u - h_i e_i)) / (2 h_i)`` with ``h_i = eps * max(1, |u_i|)``
on the raw values; 2k full trainings for k coordinates. The default ``eps`` is the cube root
of the dtype's machine epsilon (6e-6 in float64, 5e-3 in float32), which balances truncation
and rounding error for smooth problems. It is refused where the losses compute in a coarser
dtype than the parameters' (``torch.autocast`` to bf16 inside a float32 model's loss): its
rounding would swamp differences of that size, and no step derived from the coarse dtype is
reliable there, so ``eps`` must be given.

Its segment (:func:`finite_difference_segment`, an online window ``[t0, t1)``) differences the
validation loss at the window's end: each perturbed value trains the window's steps again from
the same state on the same batches (2k retrainings of the window per window); the state at
``t1`` is the unperturbed training's.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import (
    TrainState,
    check_finite_losses,
    initial_state,
    unroll,
    validation_loss,
)
from hyperdiff.errors import HyperdiffError, Range, describe, number
from hyperdiff.methods.base import Capabilities, HyperGradient, Method, Segment, finish
from hyperdiff.methods.segments import at_val_batches, detached_state
from hyperdiff.typing import Batch
from hyperdiff.wording import option

RELATIVE_STEP = Range(0.0, 1.0, open_low=True, open_high=True)  # eps: a step below |u| itself
CAPABILITIES = Capabilities(exact=False, offline=True, online=True, data_parallel=True,
                            segment_options=("eps", "warn"))


class CostWarning(UserWarning):
    """An expensive method was chosen (finite differences over many coordinates)."""


class _Coarsest(TorchFunctionMode):
    """Watches the torch calls made while ``torch.autocast`` is on for ``device_type`` and keeps
    in ``dtype`` the coarsest floating dtype they return (from ``dtype``, the problem's)."""

    def __init__(self, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.device_type, self.dtype = device_type, dtype

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if torch.is_autocast_enabled(self.device_type):
            for leaf in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(leaf, Tensor) and leaf.is_floating_point() and _coarser(
                        leaf.dtype, self.dtype):
                    self.dtype = leaf.dtype
        return out


def _coarser(dtype: torch.dtype, than: torch.dtype) -> bool:
    return torch.finfo(dtype).eps > torch.finfo(than).eps


def _evaluate_watched(problem: Problem, raw: dict[str, Tensor], eps: float | None,
                      state: TrainState | None = None, start: int = 0,
                      stop: int | None = None) -> tuple[Tensor, TrainState, Tensor]:
    """:func:`evaluate`; without an ``eps``, watched for losses computed in a dtype coarser
    than the problem's (autocast, or a loss value in it), where the default step is refused."""
    if eps is not None:
        return evaluate(problem, raw, state, start, stop)
    with _Coarsest(problem.device.type, problem.dtype) as seen:
        value, state, losses = evaluate(problem, raw, state, start, stop)
    coarse = value.dtype if _coarser(value.dtype, seen.dtype) else seen.dtype
    if coarse != problem.dtype:
        name, own = (str(d).removeprefix("torch.") for d in (coarse, problem.dtype))
        default = torch.finfo(problem.dtype).eps ** (1 / 3)
        raise HyperdiffError(
            f"finite_difference: eps must be given when the losses compute in {name}, coarser "
            f"than the parameters' {own}, as torch.autocast inside a loss makes them (got "
            f"eps=None, whose default {default:.3g} suits {own} and is swamped by {name}'s "
            "rounding; no default step is reliable there); pass one and compare a few, e.g. "
            "finite_difference(eps=0.05) and eps=0.02, or use reverse() or forward(), which "
            "differentiate the same computation exactly")
    return value, state, losses


def evaluate(problem: Problem, raw: dict[str, Tensor], state: TrainState | None = None,
             start: int = 0, stop: int | None = None) -> tuple[Tensor, TrainState, Tensor]:
    """Train steps ``start .. stop-1`` (default: the whole run) at ``raw`` from ``state``
    (default: theta_0 at ``raw``); return (validation loss, final state, train losses)."""
    hview = problem.hparams.view(raw)
    if state is None:
        with torch.no_grad():
            state = initial_state(problem, hview, differentiable=False)
    state, losses = unroll(problem, hview, state, start=start, stop=stop, differentiable=False)
    check_finite_losses(losses, "finite_difference", start)
    with torch.no_grad():
        value = validation_loss(problem, state.params, state.buffers, hview)
    return value, state, losses


def central_differences(problem: Problem, raw: dict[str, Tensor], coords: list[int],
                        eps: float | None, loss_at: Callable[[dict[str, Tensor]], Tensor]
                        ) -> tuple[Tensor, float]:
    """``(L(u + h_i e_i) - L(u - h_i e_i)) / (2 h_i)`` for each i in ``coords`` (NaN at the
    others), flat shape ``(k,)``, with ``h_i = eps * max(1, |u_i|)``; and the ``eps`` used."""
    hp = problem.hparams
    base = hp.flatten(raw)
    h = eps if eps is not None else torch.finfo(problem.dtype).eps ** (1 / 3)
    flat_grad = torch.full_like(base, float("nan"))
    for i in coords:
        step = h * max(1.0, abs(float(base[i])))
        plus, minus = base.clone(), base.clone()
        plus[i] += step
        minus[i] -= step
        _check_moved(problem, i, base[i], plus[i], minus[i], h)
        flat_grad[i] = (loss_at(hp.unflatten(plus)) - loss_at(hp.unflatten(minus))) / (2 * step)
    return flat_grad, h


def _check_moved(problem: Problem, i: int, base: Tensor, plus: Tensor, minus: Tensor,
                 eps: float) -> None:
    """Refuse a step that rounds away in the dtype the training reads the raw values in
    (:attr:`~hyperdiff.engine.problem.Problem.hparam_dtype`: the model's, at least float32):
    ``u + h == u`` (or ``u - h``) would give an exact 0 for that coordinate."""
    dtype = problem.hparam_dtype
    as_trained = [v.to(dtype) for v in (base, plus, minus)]
    if torch.equal(as_trained[0], as_trained[1]) or torch.equal(as_trained[0], as_trained[2]):
        name = problem.hparams.coordinate_names()[i]
        default = torch.finfo(problem.dtype).eps ** (1 / 3)
        raise HyperdiffError(
            f"finite_difference: eps = {eps:.3g} does not move the raw value of {name} "
            f"({float(base):.6g}) in {str(dtype).removeprefix('torch.')}: u +- eps "
            f"max(1, |u|) rounds to u, which would give an exact 0; use a larger eps (the "
            f"default for this dtype is {default:.3g})")


def _cost_warning(coords: list[int], steps: int, per: str) -> None:
    exact = option("reverse() or forward()", 'method.name = "reverse" or "forward"')
    warnings.warn(
        f"finite_difference: {len(coords)} coordinates cost {2 * len(coords)} trainings of "
        f"{steps} steps{per}; use {exact} for real work",
        CostWarning,
        stacklevel=4,
    )


def _chosen(coordinates: Any) -> list[int] | None:
    """``coordinates`` read once into a list (a generator is read here, not used up by the
    first call), refusing anything but a non-empty iterable."""
    if coordinates is None:
        return None
    if isinstance(coordinates, (str, bytes, Tensor)) or not isinstance(coordinates, Iterable):
        raise HyperdiffError(f"finite_difference: coordinates must be a sequence of ints, or "
                             f"None for all of them (got {describe(coordinates)})")
    chosen = list(coordinates)
    if not chosen:
        raise HyperdiffError("finite_difference: coordinates must name at least one coordinate "
                             "(got none: every hypergradient entry would be NaN and a tuning "
                             "loop would never move)")
    return chosen


def _coordinates(problem: Problem, coordinates: Sequence[int] | None) -> list[int]:
    k = problem.hparams.numel
    coords = list(range(k)) if coordinates is None else list(coordinates)
    for i in coords:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < k:
            raise HyperdiffError(
                f"finite_difference: coordinates must be ints in [0, {k}) (got {describe(i)})"
            )
    return coords


def _finite_difference(
    problem: Problem, raw: dict[str, Tensor], eps: float | None,
    coordinates: Sequence[int] | None, warn: bool,
) -> HyperGradient:
    started = time.perf_counter()
    coords = _coordinates(problem, coordinates)
    if warn:
        _cost_warning(coords, problem.steps, "")
    value, state, losses = _evaluate_watched(problem, raw, eps)
    flat_grad, h = central_differences(problem, raw, coords, eps,
                                       lambda u: evaluate(problem, u)[0])
    return finish(
        problem, raw, method="finite_difference", value=value,
        grad=problem.hparams.unflatten(flat_grad), params=state.params, buffers=state.buffers,
        train_losses=losses, started=started,
        computed=None if coordinates is None else coords, eps=h, coordinates=coords,
    )


def finite_difference_segment(problem: Problem, state: TrainState, raw: dict[str, Tensor],
                              start: int, stop: int, val_batches: list[Batch], carry: Any = None,
                              *, eps: float | None = None, coordinates: Sequence[int] | None = None,
                              warn: bool = True) -> Segment:
    """Central differences of the validation loss at ``val_batches`` after steps
    ``start .. stop-1`` from ``state``: every perturbed value trains the same steps from the
    same state on the same batches; the state at ``stop`` is the unperturbed run's.

    Raises:
        HyperdiffError: ``coordinates`` was given (a segment's hypergradient is complete).
    """
    if coordinates is not None:
        raise HyperdiffError(
            "finite_difference: coordinates must be None (all) for a segment of training, "
            f"whose hypergradient takes an outer step (got {list(coordinates)})")
    coords = _coordinates(problem, None)
    if warn:
        _cost_warning(coords, stop - start, " per segment")
    problem = at_val_batches(problem, val_batches)
    value, end, losses = _evaluate_watched(problem, raw, eps, state, start, stop)
    flat_grad, h = central_differences(problem, raw, coords, eps,
                                       lambda u: evaluate(problem, u, state, start, stop)[0])
    return Segment(detached_state(end), problem.hparams.unflatten(flat_grad), float(value),
                   losses, diagnostics={"eps": h})


def finite_difference(
    eps: float | None = None, coordinates: Sequence[int] | None = None, *, warn: bool = True
) -> Method:
    """Central differences on the raw values (2 trainings per coordinate).

    Args:
        eps: relative step in (0, 1) (default: cube root of the dtype's machine epsilon;
            required where the losses compute in a coarser dtype, as under autocast).
        coordinates: flat coordinates to difference (default: all); the others are NaN in the
            result, and ``diagnostics["coordinates"]`` lists those computed.
        warn: emit a :class:`CostWarning` about the cost.
    """
    if eps is not None:
        eps = number("finite_difference", "eps", eps, RELATIVE_STEP)
    coordinates = _chosen(coordinates)
    return Method(
        "finite_difference",
        lambda problem, raw: _finite_difference(problem, raw, eps, coordinates, warn),
        {"eps": eps} | ({"coordinates": list(coordinates)} if coordinates is not None else {}),
        capabilities=CAPABILITIES,
        segment_fn=partial(finite_difference_segment, eps=eps, coordinates=coordinates,
                           warn=warn),
        check_fn=_refuse_gumbel,
    )


def _refuse_gumbel(problem: Problem) -> None:
    """``Method.check``: a Gumbel choice trains one sampled configuration, piecewise constant
    in its logits, so its central differences are 0 and a tuning loop would never move it."""
    gumbel = [name for name, spec in problem.hparams.items()
              if spec.is_discrete and getattr(spec, "mode", None) == "gumbel"]
    if gumbel:
        raise HyperdiffError(
            f"finite_difference: the Gumbel choices {gumbel} train one sampled configuration, "
            "piecewise constant in their logits, so their differences are 0 and tuning would "
            "never move them; use method 'reverse' (its straight-through gradient) or "
            "mode='relax'")
