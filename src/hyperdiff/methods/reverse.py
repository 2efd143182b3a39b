"""Reverse mode: backpropagation through the unrolled inner training.

``dL_val/dlam`` is obtained by one backward pass through all T steps, whose graph (including
each step's ``create_graph`` gradient) is kept in memory: time about 2-3x plain training,
memory O(T * params).

Its segment (:func:`reverse_segment`, an online window ``[t0, t1)``) backpropagates
``L_val(theta_{t1}; B)`` through the window's steps only, the state at ``t0`` a constant:
``dL/dlam = dL/dlam|direct + dL/ds_{t1} sum_{t0<=t<t1} (prod_{t<j<t1} dPhi_j/ds) dPhi_t/dlam``.
K=1 with SGD is hypergradient descent (Baydin et al. 2018): for the learning rate, ``dL/dlr =
-<grad L_val(theta_{t+1}), grad L_train(theta_t)>``. ``backprop=k`` keeps the graph of the last
k steps only (the segment of :func:`~hyperdiff.methods.truncated.truncated`). Its batch
(:func:`_reverse_batch`, the tasks of a meta step) runs all tasks' unrolls as one vmapped
computation (:mod:`hyperdiff.engine.task_batch`).
:func:`reverse_samples` backpropagates several validation losses through one window's graph.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.task_batch import (
    TaskBatch,
    batched_unroll,
    batched_validation_loss,
    row,
    task_leaves,
)
from hyperdiff.engine.training import (
    TrainState,
    check_finite_losses,
    grads_of,
    initial_state,
    unroll,
    validation_loss,
)
from hyperdiff.methods.base import Capabilities, HyperGradient, Method, Segment, finish
from hyperdiff.methods.segments import at_val_batches, detached_state, sample_grads
from hyperdiff.typing import Batch

CAPABILITIES = Capabilities(exact=True, offline=True, online=True, data_parallel=True)


def _reverse(problem: Problem, raw: dict[str, Tensor]) -> HyperGradient:
    started = time.perf_counter()
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    hview = problem.hparams.view(leaves)
    state = initial_state(problem, hview, differentiable=True)
    state, losses = unroll(problem, hview, state, differentiable=True)
    check_finite_losses(losses, "reverse")
    value = validation_loss(problem, state.params, state.buffers, hview)
    grad = grads_of(value, leaves, create_graph=False)
    return finish(
        problem, leaves, method="reverse", value=value, grad=grad, params=state.params,
        buffers=state.buffers, train_losses=losses, started=started,
    )


def _reverse_batch(tasks: TaskBatch, raw: dict[str, Tensor]) -> list[HyperGradient]:
    """Every task's reverse-mode hypergradient from one batched unroll
    (:mod:`hyperdiff.engine.task_batch`): ``d(sum_i L_val,i)/dU``, row ``i`` task ``i``'s."""
    started = time.perf_counter()
    leaves = task_leaves(raw, tasks.size)
    state, losses = batched_unroll(tasks, leaves)
    for task_losses in losses:
        check_finite_losses(task_losses, "reverse")
    values = batched_validation_loss(tasks, state.params, leaves)
    grads = grads_of(values.sum(), leaves, create_graph=False)
    return [finish(problem, raw, method="reverse", value=values[i], grad=row(grads, i),
                   params=row(state.params, i), buffers=problem.buffers, train_losses=losses[i],
                   started=started, batched=tasks.size)
            for i, problem in enumerate(tasks.problems)]


def reverse_segment(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                    stop: int, val_batches: list[Batch], carry: Any = None, *,
                    backprop: int | None = None) -> Segment:
    """Train steps ``start .. stop-1`` with their graph and backpropagate the validation loss
    at the end through them (module doc); with ``backprop = k`` only the last k steps keep
    their graph (the first ones are trained plainly, as a constant start)."""
    return reverse_samples(problem, state, raw, start, stop, [val_batches], carry,
                           backprop=backprop)[0]


def reverse_samples(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                    stop: int, val_sets: list[list[Batch]], carry: Any = None, *,
                    backprop: int | None = None) -> list[Segment]:
    """:func:`reverse_segment` at each of ``val_sets``: the window's graph is built once and
    the sets' validation losses are backpropagated through it together
    (:func:`~hyperdiff.methods.segments.sample_grads`)."""
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    hview = problem.hparams.view(leaves)
    plain = stop - min(stop - start, backprop or stop - start)
    if plain > start:
        with torch.no_grad():
            state, first = unroll(problem, problem.hparams.view(problem.raw_tensors(raw)), state,
                                  start=start, stop=plain, differentiable=False)
        check_finite_losses(first, "online reverse", start)
        segments = reverse_samples(problem, state, raw, plain, stop, val_sets)
        return [s._replace(train_losses=torch.cat([first, s.train_losses])) for s in segments]
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    begin = TrainState(params, dict(state.buffers), state.opt_state)
    end, losses = unroll(problem, hview, begin, start=start, stop=stop, differentiable=True)
    check_finite_losses(losses, "online reverse", start)
    values = [validation_loss(at_val_batches(problem, val), end.params, end.buffers, hview)
              for val in val_sets]
    grads = sample_grads(values, list(leaves.values()))
    kept = detached_state(end)
    return [Segment(kept, dict(zip(leaves, grad, strict=True)), float(value.detach()), losses)
            for value, grad in zip(values, grads, strict=True)]


def reverse() -> Method:
    """Exact hypergradient by backpropagating through all inner steps (memory O(T))."""
    return Method("reverse", _reverse, capabilities=CAPABILITIES, segment_fn=reverse_segment,
                  samples_fn=reverse_samples, batch_fn=_reverse_batch)
