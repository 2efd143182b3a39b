"""Checkpointed reverse mode: exact hypergradients with O(sqrt(T)) stored states.

Write one inner step as ``s_{t+1} = Phi_t(s_t, lam)`` with ``s = (params, buffers, optimizer
state)``. The T steps are split into S segments ``[b_0=0, b_1) ... [b_{S-1}, b_S=T)``.

1. Forward, without a graph: run segments 0 .. S-2 and store their starts ``s_{b_i}``.
2. The last segment runs with a graph and the validation loss on top; one backward pass gives
   ``g = dL_val/dlam`` through that segment (direct term included) and the adjoint
   ``a_{b_{S-1}} = dL_val/ds_{b_{S-1}}``.
3. For the earlier segments, from the last to the first: recompute
   ``s_{b_{i+1}} = Phi_{b_{i+1}-1} o ... o Phi_{b_i}(s_{b_i}, lam)`` *with* a graph from the
   stored ``s_{b_i}`` and take one vector-Jacobian product

       a_{b_i} = a_{b_{i+1}}^T ds_{b_{i+1}}/ds_{b_i},    g += a_{b_{i+1}}^T ds_{b_{i+1}}/dlam.

4. When theta_0 is a hyperparameter (``hd.initialization``), ``g += a_0^T ds_0/dlam``
   (:func:`~hyperdiff.engine.training.initial_vjp`).

The replay calls the same :func:`~hyperdiff.engine.training.train_step` with the same step indices,
so it sees the same batches and dropout masks and reproduces the forward pass bit for bit
(``diagnostics["replay_mismatch"]``, the largest difference between a replayed segment end and
its stored checkpoint, is 0). A difference above rounding (``sqrt(eps) * max(1, |s|)``) means
training is not a function of ``(step, seed)`` and raises. The hypergradient equals full
reverse mode up to the order of floating-point summation. Memory: S checkpoints plus the graph
of one segment of about T/S steps (``S = ceil(sqrt(T))`` by default balances the two); time:
one extra graph-free pass over the first ``T - T/S`` steps on top of plain reverse mode.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import (
    TrainState,
    check_finite_losses,
    initial_state,
    initial_vjp,
    unroll,
    validation_loss,
)
from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.methods.base import Capabilities, HyperGradient, Method, finish, zeros_for_unused
from hyperdiff.tree import tree_flatten, tree_unflatten

CAPABILITIES = Capabilities(exact=True, offline=True, data_parallel=True)
"""Offline only: its segments of recomputation are not segments of training."""


def segment_bounds(steps: int, segments: int) -> list[int]:
    """``[b_0=0, ..., b_S=steps]``: ``min(segments, steps)`` near-equal segments."""
    s = min(segments, steps)
    return [round(i * steps / s) for i in range(s + 1)]


def _replay(
    problem: Problem, start: TrainState, step0: int, stop: int, raw: dict[str, Tensor]
) -> tuple[list[Tensor], list[Tensor], TrainState, Any, Tensor]:
    """Run steps ``step0 .. stop-1`` with a graph from fresh leaves of ``start`` and ``raw``.

    Returns the state leaves, the raw leaves, the end state, the hyperparameter view and the
    train losses.
    """
    flat, spec = tree_flatten(tuple(start))
    leaves = [x.detach().requires_grad_() for x in flat]
    raw_leaves = [v.detach().requires_grad_() for v in raw.values()]
    hview = problem.hparams.view(dict(zip(raw, raw_leaves, strict=True)))
    end, losses = unroll(
        problem, hview, TrainState(*tree_unflatten(leaves, spec)), start=step0, stop=stop,
        differentiable=True,
    )
    check_finite_losses(losses, "checkpointed", step0)
    return leaves, raw_leaves, end, hview, losses


def _pull_back(
    outputs: list[Tensor], inputs: list[Tensor], adjoint: list[Tensor] | None
) -> list[Tensor]:
    """``adjoint^T d outputs / d inputs`` (``outputs`` a scalar when ``adjoint`` is None)."""
    if adjoint is not None:
        pairs = [(o, a) for o, a in zip(outputs, adjoint, strict=True) if o.requires_grad]
        outputs, adjoint = [o for o, _ in pairs], [a for _, a in pairs]
    grads = torch.autograd.grad(outputs, inputs, adjoint, allow_unused=True)
    return zeros_for_unused(grads, inputs)


def _checkpointed(problem: Problem, raw: dict[str, Tensor], segments: int | None) -> HyperGradient:
    started = time.perf_counter()
    T = problem.steps
    bounds = segment_bounds(T, segments if segments is not None else math.isqrt(T - 1) + 1)
    raw = {n: v.detach() for n, v in raw.items()}
    hview = problem.hparams.view(raw)

    # 1. graph-free forward pass over all but the last segment, storing each segment's start
    with torch.no_grad():
        state = initial_state(problem, hview, differentiable=False)
    starts, all_losses = [], []
    for step0, stop in itertools.pairwise(bounds[:-1]):
        starts.append(state)
        state, losses = unroll(problem, hview, state, start=step0, stop=stop, differentiable=False)
        check_finite_losses(losses, "checkpointed", step0)
        all_losses.append(losses)
    starts.append(state)

    # 2. the last segment with its graph, the validation loss on top: the adjoint at b_{S-1}
    leaves, raw_leaves, end, hview, losses = _replay(problem, state, bounds[-2], T, raw)
    all_losses.append(losses)
    value = validation_loss(problem, end.params, end.buffers, hview)
    grads = _pull_back([value], leaves + raw_leaves, None)
    adjoint, grad_raw = grads[: len(leaves)], grads[len(leaves) :]

    # 3. earlier segments from last to first: replay with a graph, one vjp each
    mismatch = 0.0
    for i in range(len(bounds) - 3, -1, -1):
        leaves, raw_leaves, seg_end, _, _ = _replay(
            problem, starts[i], bounds[i], bounds[i + 1], raw
        )
        outputs = tree_flatten(tuple(seg_end))[0]
        stored = tree_flatten(tuple(starts[i + 1]))[0]
        mismatch = max(
            mismatch, _check_replay(problem, outputs, stored, bounds[i], bounds[i + 1])
        )
        grads = _pull_back(outputs, leaves + raw_leaves, adjoint)
        adjoint = grads[: len(leaves)]
        grad_raw = [g + v for g, v in zip(grad_raw, grads[len(leaves) :], strict=True)]
        starts.pop()  # starts[i + 1], the end of segment i: no longer needed
    if problem.initialization is not None:  # 4. theta_0 = u: g += a_0^T ds_0/du
        adjoint_params = tree_unflatten(adjoint, tree_flatten(tuple(starts[0]))[1])[0]
        grad_raw = [g + v for g, v in zip(grad_raw, initial_vjp(problem, raw, adjoint_params),
                                          strict=True)]

    return finish(
        problem, raw, method="checkpointed", value=value,
        grad=dict(zip(raw, grad_raw, strict=True)), params=end.params, buffers=end.buffers,
        train_losses=torch.cat(all_losses), started=started,
        segments=len(bounds) - 1, replay_mismatch=mismatch,
    )


def _check_replay(
    problem: Problem, replayed: list[Tensor], stored: list[Tensor], step0: int, stop: int
) -> float:
    """The largest difference between a replayed segment end and its checkpoint; raise if it
    exceeds rounding, ``sqrt(eps) * max(1, max |stored|)``."""
    difference = _max_difference(replayed, stored)
    scale = max([float(x.abs().max()) for x in stored if x.numel()], default=0.0)
    tolerance = torch.finfo(problem.dtype).eps ** 0.5 * max(1.0, scale)
    if not difference <= tolerance:
        raise HyperdiffError(
            f"checkpointed: replaying steps {step0}..{stop - 1} (seed {problem.seed}) must "
            f"reproduce the stored state (got a difference of {difference:.3g}, above the "
            f"rounding tolerance {tolerance:.3g}); training must be a function of (step, seed): "
            f"train_data {problem.train_data.describe()} must yield the same batches on "
            "a replay (pass a DataLoader over a map-style Dataset, a list, or fn(step, seed)) "
            "and the train loss must keep no state between calls (its random draws are "
            "seeded by step and seed)"
        )
    return difference


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
        capabilities=CAPABILITIES,
    )
