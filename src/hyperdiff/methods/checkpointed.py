"""Checkpointed reverse mode: exact hypergradients with O(sqrt(T)) stored states.

Write one inner step as ``s_{t+1} = Phi_t(s_t, lam)`` with ``s = (params, buffers, optimizer
state)``. The T steps are split into S segments ``[b_0=0, b_1) ... [b_{S-1}, b_S=T)``.

1. Forward, without a graph: run all steps and store the checkpoints ``s_{b_i}``.
2. Backward, segment by segment from the last: start from the final adjoint
   ``a_T = dL_val/ds_T`` and ``g = dL_val/dlam|direct``; for segment i recompute
   ``s_{b_{i+1}} = Phi_{b_{i+1}-1} o ... o Phi_{b_i}(s_{b_i}, lam)`` *with* a graph from the
   stored ``s_{b_i}`` and take one vector-Jacobian product

       a_{b_i} = a_{b_{i+1}}^T ds_{b_{i+1}}/ds_{b_i},    g += a_{b_{i+1}}^T ds_{b_{i+1}}/dlam.

The replay calls the same :func:`~hyperdiff.training.train_step` with the same step indices,
so it sees the same batches and dropout masks and reproduces the forward pass bit for bit
(``diagnostics["replay_mismatch"]``, the largest difference between a replayed segment end and
its stored checkpoint, is 0). The hypergradient equals full reverse mode up to the order of
floating-point summation. Memory: S checkpoints plus the graph of one segment of about T/S
steps (``S = ceil(sqrt(T))`` by default balances the two); time: one extra graph-free
forward pass over plain reverse mode.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import HyperdiffError, describe
from ..problem import Problem
from ..training import TrainState, check_finite_losses, initial_state, unroll, validation_loss
from .base import HyperGradient, Method, finish, zeros_for_unused


def segment_bounds(steps: int, segments: int) -> list[int]:
    """``[b_0=0, ..., b_S=steps]``: ``min(segments, steps)`` near-equal segments."""
    s = min(segments, steps)
    return [round(i * steps / s) for i in range(s + 1)]


def _as_leaves(state: TrainState) -> tuple[list[Tensor], Any]:
    """Flatten a state into fresh leaves that require grad, and the tree spec."""
    flat, spec = tree_flatten(tuple(state))
    return [x.detach().requires_grad_() for x in flat], spec


def _segment_vjp(
    problem: Problem, start: TrainState, stop: int, step0: int, adjoint: list[Tensor],
    raw: dict[str, Tensor],
) -> tuple[list[Tensor], list[Tensor], float]:
    """Replay steps ``step0 .. stop-1`` from ``start``; return the adjoint of the start state,
    the vjp with the raw values, and the largest difference with the stored end state."""
    leaves, spec = _as_leaves(start)
    raw_leaves = [v.detach().requires_grad_() for v in raw.values()]
    hview = problem.hparams.view(dict(zip(raw, raw_leaves, strict=True)))
    end, _ = unroll(
        problem, hview, TrainState(*tree_unflatten(leaves, spec)), start=step0, stop=stop,
        differentiable=True,
    )
    outputs = tree_flatten(tuple(end))[0]
    pairs = [(o, a) for o, a in zip(outputs, adjoint, strict=True) if o.requires_grad]
    inputs = leaves + raw_leaves
    grads = torch.autograd.grad(
        [o for o, _ in pairs], inputs, [a for _, a in pairs], allow_unused=True
    )
    grads = zeros_for_unused(grads, inputs)
    return grads[: len(leaves)], grads[len(leaves) :], outputs


def _checkpointed(problem: Problem, raw: dict[str, Tensor], segments: int | None) -> HyperGradient:
    started = time.perf_counter()
    T = problem.steps
    bounds = segment_bounds(T, segments if segments is not None else math.isqrt(T - 1) + 1)
    raw = {n: v.detach() for n, v in raw.items()}
    hview = problem.hparams.view(raw)

    # 1. graph-free forward pass, storing the state at each segment start
    with torch.no_grad():
        state = initial_state(problem, differentiable=False)
    checkpoints, all_losses = [], []
    for step0, stop in zip(bounds[:-1], bounds[1:], strict=True):
        checkpoints.append(state)
        state, losses = unroll(problem, hview, state, start=step0, stop=stop, differentiable=False)
        check_finite_losses(losses, "checkpointed", step0)
        all_losses.append(losses)

    # 2. final adjoint and the direct term
    leaves, spec = _as_leaves(state)
    params, buffers, _ = tree_unflatten(leaves, spec)
    raw_leaves = {n: v.clone().requires_grad_() for n, v in raw.items()}
    value = validation_loss(problem, params, buffers, problem.hparams.view(raw_leaves))
    inputs = leaves + list(raw_leaves.values())
    grads = zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True), inputs)
    adjoint, grad_raw = grads[: len(leaves)], grads[len(leaves) :]

    # 3. segments from last to first: replay with a graph, one vjp each
    mismatch, stored_end = 0.0, tree_flatten(tuple(state))[0]
    for i in range(len(checkpoints) - 1, -1, -1):
        adjoint, vjp_raw, replayed = _segment_vjp(
            problem, checkpoints[i], bounds[i + 1], bounds[i], adjoint, raw
        )
        grad_raw = [g + v for g, v in zip(grad_raw, vjp_raw, strict=True)]
        mismatch = max(mismatch, _max_difference(replayed, stored_end))
        stored_end = tree_flatten(tuple(checkpoints[i]))[0]
        checkpoints[i] = None  # the segment is done: free its checkpoint

    return finish(
        problem, raw, method="checkpointed", value=value,
        grad=dict(zip(raw, grad_raw, strict=True)), params=params, buffers=buffers,
        train_losses=torch.cat(all_losses), started=started,
        segments=len(bounds) - 1, replay_mismatch=mismatch,
    )


def _max_difference(a: list[Tensor], b: list[Tensor]) -> float:
    diffs = [float((x.detach() - y).abs().max()) for x, y in zip(a, b, strict=True) if x.numel()]
    return max(diffs, default=0.0)


def checkpointed(segments: int | None = None) -> Method:
    """Exact hypergradient by segment-wise recomputation (memory O(S + T/S) steps).

    Args:
        segments: number S of checkpointed segments (at most T are used); default
            ``ceil(sqrt(T))``. S=1 is plain reverse mode after a graph-free forward pass.

    Raises:
        HyperdiffError: ``segments`` is not a positive int.
    """
    if segments is not None and (
        isinstance(segments, bool) or not isinstance(segments, int) or segments < 1
    ):
        raise HyperdiffError(
            f"checkpointed: segments must be a positive int or None (got {describe(segments)})"
        )
    return Method(
        "checkpointed", lambda problem, raw: _checkpointed(problem, raw, segments),
        {"segments": segments},
    )
