"""Truncated reverse mode: backpropagate through the last K of T inner steps only.

The first ``T - K`` steps run without a graph; the graph starts at ``theta_{T-K}`` (and the
optimizer state and buffers there), treated as constants. The result is the exact derivative
of ``lam -> L_val(Phi_{T-1} o ... o Phi_{T-K}(s_{T-K}, lam), lam)`` with ``s_{T-K}`` frozen:

    g_K = dL_val/dlam|direct + sum_{t=T-K}^{T-1} a_{t+1}^T dPhi_t/dlam,

where ``a_t`` is the reverse-mode adjoint of the state. It drops the terms
``t < T - K``, i.e. it ignores ``d s_{T-K} / dlam``: a *biased* approximation (Shaban et al.,
2019, "Truncated back-propagation for bilevel optimization"), cheap in memory (O(K) steps).
With ``K >= T`` it is exactly :func:`~hyperdiff.methods.reverse.reverse`. Its segment is
reverse mode's with the graph over the segment's last K steps
(:func:`~hyperdiff.methods.reverse.reverse_segment`, ``backprop=K``). ``fraction=f`` takes
``K = ceil(f T)`` of each problem's ``T`` steps (one setting for tasks of different lengths).

``head="curvature"`` (offline) puts the dropped term back approximately: an exact tail over a
carried head. The first ``T - K`` steps carry the tangents ``Z_{T-K} = d s_{T-K} / du`` of the
state (the parameters and the optimizer's moments) under the diagonal curvature model of
:mod:`hyperdiff.methods.curvature` (:func:`~hyperdiff.methods.curvature.curvature_head`), and
the last K steps are differentiated exactly from the state at ``T - K`` as leaves::

    g = dL_val/dlam|direct + sum_{t=T-K}^{T-1} a_{t+1}^T dPhi_t/dlam + a_{T-K}^T Z_{T-K},

with ``a_{T-K}`` the exact adjoint of the state at ``T - K``. It is exact where the model is (a
loss linear in theta with ``curvature_scale=0``) and for ``K >= T``; its cost is a plain
training of the head (elementwise tangents) plus reverse mode over the tail.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import (
    TrainState,
    check_finite_losses,
    grads_of,
    initial_state,
    unroll,
    validation_loss,
    zeros_for_unused,
)
from hyperdiff.errors import HyperdiffError, fail, is_number, positive_int
from hyperdiff.methods.base import Capabilities, HyperGradient, Method, finish
from hyperdiff.methods.curvature import (
    carried_hypergradient,
    check_optimizer,
    curvature_head,
    curvature_options,
    state_tangents,
)
from hyperdiff.methods.curvature_rule import carried_rows
from hyperdiff.methods.reverse import reverse_samples, reverse_segment

CAPABILITIES = Capabilities(exact=False, offline=True, online=True, data_parallel=True,
                            segment_options=("k",))


def _frozen_prefix(
    problem: Problem, raw: dict[str, Tensor], stop: int
) -> tuple[TrainState, Tensor]:
    """Steps ``0 .. stop-1`` without a graph; the state comes back as fresh leaves."""
    hview = problem.hparams.view({n: v.detach() for n, v in raw.items()})
    with torch.no_grad():
        state = initial_state(problem, hview, differentiable=False)
    state, losses = unroll(problem, hview, state, stop=stop, differentiable=False)
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    return TrainState(params, state.buffers, state.opt_state), losses


def steps_kept(problem: Problem, k: int | None, fraction: float | None) -> int:
    """The K of the module doc: ``k``, or ``ceil(fraction * T)`` (at least 1; the product
    rounded to 9 decimals first, so ``0.07 * 100`` is 7 steps, not 8)."""
    if k is not None or fraction is None:
        return k or problem.steps
    return max(1, math.ceil(round(fraction * problem.steps, 9)))


def _check_head(problem: Problem) -> None:
    """:func:`check_optimizer` worded for the curvature head of ``truncated``."""
    check_optimizer(problem, caller="truncated", what="head='curvature'",
                    instead="head=None, method 'reverse'")


def _check_head_runs(problem: Problem, *, k: int | None, fraction: float | None) -> None:
    """``Method.check``: the head's check where it runs (``K < T``: a prefix is left)."""
    if steps_kept(problem, k, fraction) < problem.steps:
        _check_head(problem)


def _truncated(problem: Problem, raw: dict[str, Tensor], k: int | None,
               fraction: float | None = None, head: str | None = None,
               scale: float | str | None = None) -> HyperGradient:
    started = time.perf_counter()
    k = steps_kept(problem, k, fraction)
    start = max(problem.steps - k, 0)
    if start > 0 and problem.initialization is not None:
        raise HyperdiffError(
            f"truncated: k must be at least the {problem.steps} inner steps for a problem whose "
            f"initialization {problem.initialization!r} is a hyperparameter (got k={k}): "
            "theta_0 acts only through the first steps, which are not differentiated, so its "
            "hypergradient would be zero; use reverse() or checkpointed()"
        )
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    hview = problem.hparams.view(leaves)
    tangent = None
    if start == 0:
        state, prefix_losses = initial_state(problem, hview, differentiable=True), None
    elif head == "curvature":
        _check_head(problem)
        state, tangent, prefix_losses = curvature_head(problem, raw, start, scale=scale)
        state = _as_leaves(state)
    else:
        state, prefix_losses = _frozen_prefix(problem, raw, start)
    if prefix_losses is not None:
        check_finite_losses(prefix_losses, "truncated")
    begin = state
    state, losses = unroll(problem, hview, state, start=start, differentiable=True)
    check_finite_losses(losses, "truncated", start)
    if prefix_losses is not None:
        losses = torch.cat([prefix_losses, losses])
    value = validation_loss(problem, state.params, state.buffers, hview)
    if tangent is None:
        grad = grads_of(value, leaves, create_graph=False)
    else:
        grad = _through_head(problem, value, leaves, state_tangents(tangent, begin))
    return finish(
        problem, leaves, method="truncated", value=value, grad=grad, params=state.params,
        buffers=state.buffers, train_losses=losses, started=started,
        k=k, differentiated_steps=problem.steps - start, head=head if start > 0 else None,
    )


def _as_leaves(state: TrainState) -> TrainState:
    """The parameters and the optimizer state as fresh leaves (their adjoints are read)."""
    opt_state = type(state.opt_state)(*(
        {k: v.detach().requires_grad_() for k, v in field.items()}
        for field in state.opt_state))
    return TrainState({k: v.detach().requires_grad_() for k, v in state.params.items()},
                      state.buffers, opt_state)


def _through_head(problem: Problem, value: Tensor, leaves: dict[str, Tensor],
                  pairs: list[tuple[Tensor, Any]]) -> dict[str, Tensor]:
    """``dL/du``: the tail's exact part (the raw values' gradient) plus ``a^T Z`` over the
    head's carried state (``pairs``: tangents and the state tensors they belong to)."""
    tensors = [t for _, field in pairs for t in field.values()]
    inputs = [*leaves.values(), *tensors]
    grads = zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True), inputs)
    hp = problem.hparams
    direct = hp.flatten(dict(zip(leaves, grads[: len(leaves)], strict=True)))
    adjoints, offset = [], len(leaves)
    for _, field in pairs:
        size = len(field)
        adjoints.append(torch.cat([g.reshape(-1) for g in grads[offset:offset + size]]))
        offset += size
    with torch.no_grad():
        flat_grad = carried_hypergradient(direct, pairs, adjoints, carried_rows(problem))
    return hp.unflatten(flat_grad)


HEADS = (None, "curvature")


def _refuse_segment(options: dict[str, Any]) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise HyperdiffError(
            f"truncated: an online segment takes k steps back (got the offline options "
            f"{options}): use truncated(k) online, fraction and head offline")
    return refuse


def truncated(k: int | None = None, *, fraction: float | None = None,
              head: str | None = None, curvature_scale: float | str | None = None) -> Method:
    """Biased hypergradient by backpropagating through the last ``k`` inner steps only.

    Memory O(k) steps; ignores how the state at step ``T - k`` depends on the
    hyperparameters (``diagnostics["differentiated_steps"]`` says how many steps were
    differentiated), or estimates it with ``head="curvature"`` (module doc). ``k >= T`` gives
    the exact reverse-mode hypergradient.

    Args:
        k: number of final steps to differentiate, ``k >= 1``.
        fraction: instead of ``k``, this share of each problem's steps, in ``(0, 1]``
            (``k = ceil(fraction * T)``); offline only.
        head: ``None`` (the first steps are constants) or ``"curvature"`` (their effect
            through the state at ``T - k`` carried as tangents; heavy-ball SGD, Adam, AdamW);
            offline only.
        curvature_scale: the head's curvature estimate's scale (``None`` or ``"auto"``: the
            training batch's rows, or 1 with a fixed batch; ``"rows"``, a number:
            :func:`~hyperdiff.methods.curvature.batch_scale`); with ``head="curvature"`` only.

    Raises:
        HyperdiffError: not exactly one of ``k`` and ``fraction``, ``k`` not a positive int,
            ``fraction`` not in ``(0, 1]``, an unknown ``head``, or ``curvature_scale`` not
            None, ``"auto"``, ``"rows"``, 0 or a number > 0 (or given without a head).
    """
    if (k is None) == (fraction is None):
        raise fail("truncated", "k", "a positive int, or None with a fraction given "
                   "(exactly one of k and fraction)", k)
    if k is not None:
        k = positive_int("truncated", "k", k)
    if fraction is not None and (not is_number(fraction) or not 0 < fraction <= 1):
        raise fail("truncated", "fraction", "a number in (0, 1]", fraction)
    if head not in HEADS:
        raise fail("truncated", "head", f"one of {list(HEADS)}", head)
    if curvature_scale not in (None, "auto") and head is None:
        raise fail("truncated", "curvature_scale", "None without head='curvature' (the scale "
                   "of the head's curvature model)", curvature_scale)
    scale = curvature_options("truncated", None, "steps", curvature_scale)[2]
    fraction = None if fraction is None else float(fraction)
    options: dict[str, Any] = {name: value for name, value in (("k", k), ("fraction", fraction))
                               if value is not None}
    if head is not None:  # the scale too, None included (data_parallel sets the full batch's)
        options.update(head=head, curvature_scale=scale)
    run = partial(_truncated, k=k, fraction=fraction, head=head, scale=scale)
    online = k is not None and len(options) == 1  # the segment takes k steps back
    return Method("truncated", lambda problem, raw: run(problem, raw), options,
                  capabilities=CAPABILITIES,
                  segment_fn=(partial(reverse_segment, backprop=k) if online
                              else _refuse_segment(options)),
                  samples_fn=partial(reverse_samples, backprop=k) if online else None,
                  check_fn=(partial(_check_head_runs, k=k, fraction=fraction)
                            if head == "curvature" else None))
