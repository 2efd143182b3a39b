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
its stored checkpoint, is 0). A difference above rounding (:data:`REPLAY_ULPS` ulps of any
stored element) means training is not a function of ``(step, seed)`` and raises. The
hypergradient equals full reverse mode up to the order of floating-point summation. Memory: S
checkpoints plus the graph of one segment of about T/S steps (``S = ceil(sqrt(T))`` by default
balances the two); time: one extra graph-free pass over the first ``T - T/S`` steps on top of
plain reverse mode.

Its segment (:func:`checkpointed_segment`, an online window ``[t0, t1)`` from the state at
``t0``, a constant) runs the same scheme over the window's K steps in ``S`` sub-segments
(default ``ceil(sqrt(K))``): the state at ``t1``, ``dL_val/du`` at the window's validation
batches (direct term included), no carry. The offline call is the segment ``[0, T)`` from
theta_0, plus step 4.
"""

from __future__ import annotations

import itertools
import math
import time
from functools import partial
from typing import Any, NamedTuple

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
from hyperdiff.methods.base import (
    Capabilities,
    HyperGradient,
    Method,
    Segment,
    finish,
    zeros_for_unused,
)
from hyperdiff.methods.segments import at_val_batches, detached_state
from hyperdiff.tree import tree_flatten, tree_unflatten
from hyperdiff.typing import Batch

CAPABILITIES = Capabilities(exact=True, offline=True, online=True, data_parallel=True,
                            segment_options=("segments",))


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


def default_segments(steps: int) -> int:
    """``S = ceil(sqrt(steps))``: S checkpoints balance the graph of one sub-segment."""
    return math.isqrt(steps - 1) + 1


class Span(NamedTuple):
    """What :func:`backpropagate` returns: the end state (with the last sub-segment's graph),
    the validation loss, the raw hypergradient (one tensor per raw value), the adjoint of the
    start state (flat leaves), the train losses, the sub-segments and the replay mismatch."""

    end: TrainState
    value: Tensor
    grad: list[Tensor]
    adjoint: list[Tensor]
    losses: Tensor
    segments: int
    mismatch: float


def backpropagate(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                  stop: int, segments: int) -> Span:
    """Steps ``1.-3.`` of the module doc over steps ``start .. stop-1`` from ``state`` (a
    constant, detached), in ``segments`` sub-segments; the validation loss is ``problem``'s."""
    bounds = [start + b for b in segment_bounds(stop - start, segments)]
    hview = problem.hparams.view(raw)

    # 1. graph-free forward pass over all but the last segment, storing each segment's start
    starts, all_losses = [], []
    for step0, end in itertools.pairwise(bounds[:-1]):
        starts.append(state)
        state, losses = unroll(problem, hview, state, start=step0, stop=end, differentiable=False)
        check_finite_losses(losses, "checkpointed", step0)
        all_losses.append(losses)
    starts.append(state)

    # 2. the last segment with its graph, the validation loss on top: the adjoint at b_{S-1}
    leaves, raw_leaves, last, hview, losses = _replay(problem, state, bounds[-2], stop, raw)
    all_losses.append(losses)
    value = validation_loss(problem, last.params, last.buffers, hview)
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
    return Span(last, value, grad_raw, adjoint, torch.cat(all_losses), len(bounds) - 1, mismatch)


def _checkpointed(problem: Problem, raw: dict[str, Tensor], segments: int | None) -> HyperGradient:
    """The segment ``[0, T)`` from theta_0, plus ``a_0^T ds_0/du`` for an initialization."""
    started = time.perf_counter()
    T = problem.steps
    raw = {n: v.detach() for n, v in raw.items()}
    with torch.no_grad():
        state = initial_state(problem, problem.hparams.view(raw), differentiable=False)
    span = backpropagate(problem, state, raw, 0, T,
                         segments if segments is not None else default_segments(T))
    grad_raw = span.grad
    if problem.initialization is not None:  # 4. theta_0 = u: g += a_0^T ds_0/du
        adjoint_params = tree_unflatten(span.adjoint, tree_flatten(tuple(state))[1])[0]
        grad_raw = [g + v for g, v in zip(grad_raw, initial_vjp(problem, raw, adjoint_params),
                                          strict=True)]
    return finish(
        problem, raw, method="checkpointed", value=span.value,
        grad=dict(zip(raw, grad_raw, strict=True)), params=span.end.params,
        buffers=span.end.buffers, train_losses=span.losses, started=started,
        segments=span.segments, replay_mismatch=span.mismatch,
    )


def checkpointed_segment(problem: Problem, state: TrainState, raw: dict[str, Tensor],
                         start: int, stop: int, val_batches: list[Batch], carry: Any = None, *,
                         segments: int | None = None) -> Segment:
    """The module doc's recomputation over steps ``start .. stop-1`` from ``state``, in
    ``segments`` sub-segments (default ``ceil(sqrt(stop - start))``): the state at ``stop``, the
    hypergradient of the validation loss at ``val_batches`` (direct term included), no carry."""
    raw = {n: v.detach() for n, v in raw.items()}
    span = backpropagate(at_val_batches(problem, val_batches), state, raw, start, stop,
                         segments if segments is not None else default_segments(stop - start))
    return Segment(detached_state(span.end), dict(zip(raw, span.grad, strict=True)),
                   float(span.value.detach()), span.losses,
                   diagnostics={"segments": span.segments, "replay_mismatch": span.mismatch})


REPLAY_ULPS = 4
"""The replay check's tolerance per element, in units of its dtype's epsilon relative to the
stored value: ``|replayed - stored| <= REPLAY_ULPS * eps * |stored|``. A deterministic replay
is exact (0 on CPU); the few ulps leave room for a GPU kernel that sums in another order,
nothing a training that changes between two runs would stay inside."""


def _check_replay(
    problem: Problem, replayed: list[Tensor], stored: list[Tensor], step0: int, stop: int
) -> float:
    """The largest difference between a replayed segment end and its checkpoint; raise where
    any element differs by more than :data:`REPLAY_ULPS` ulps of the stored value (an integer
    tensor, such as a step count, must be equal)."""
    off, total, worst = 0, 0, (0.0, 0.0, 0.0)  # (relative difference, replayed, stored)
    for new, old in zip(replayed, stored, strict=True):
        new = new.detach()
        total += old.numel()
        if not old.numel():
            continue
        gap = (new - old).abs() if old.is_floating_point() else (new != old).to(torch.float64)
        limit = (REPLAY_ULPS * torch.finfo(old.dtype).eps * old.abs() if old.is_floating_point()
                 else torch.zeros_like(gap))
        bad = ~((new == old) | (gap <= limit))
        count = int(bad.sum())
        if count:
            off += count
            relative = torch.where(bad, gap / old.abs().to(gap.dtype), gap.new_zeros(()))
            relative = relative.nan_to_num(nan=float("inf"))
            index = int(relative.reshape(-1).argmax())
            entry = (float(relative.reshape(-1)[index]), float(new.reshape(-1)[index]),
                     float(old.reshape(-1)[index]))
            worst = max(worst, entry, key=lambda e: e[0])
    if off:
        raise HyperdiffError(
            f"checkpointed: replaying steps {step0}..{stop - 1} (seed {problem.seed}) must "
            f"reproduce the stored state to rounding ({REPLAY_ULPS} ulps per element); got "
            f"{off} of {total} entries off, the largest by {worst[0]:.3g} of the stored value "
            f"({worst[1]:.9g} replayed, {worst[2]:.9g} stored): the training is not a "
            f"function of (step, seed). train_data {problem.train_data.describe()} must yield "
            "the same batches on a replay (pass a DataLoader over a map-style Dataset, a list, "
            "or fn(step, seed)), and the train loss must keep no state between calls and draw "
            "its randomness from the step context (ctx.next_seed(), seeded by step and seed); "
            "on a GPU, torch.use_deterministic_algorithms(True) makes kernels that sum in a "
            "varying order repeatable"
        )
    return _max_difference(replayed, stored)


def _max_difference(a: list[Tensor], b: list[Tensor]) -> float:
    diffs = [float((x.detach() - y).abs().max()) for x, y in zip(a, b, strict=True) if x.numel()]
    return max(diffs, default=0.0)


def checkpointed(segments: int | None = None) -> Method:
    """Exact hypergradient by segment-wise recomputation (memory O(S + T/S) steps).

    Args:
        segments: number S of checkpointed segments (at most T are used); default
            ``ceil(sqrt(T))``. S=1 is plain reverse mode (T loss calls; S segments cost
            ``T + T - T/S``).

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
        segment_fn=partial(checkpointed_segment, segments=segments),
    )
