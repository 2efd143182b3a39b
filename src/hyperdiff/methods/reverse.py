"""Reverse mode: backpropagation through the unrolled inner training.

``dL_val/dlam`` is obtained by one backward pass through all T steps, whose graph (including
each step's ``create_graph`` gradient) is kept in memory: time about 2-3x plain training,
memory O(T * params).
"""

from __future__ import annotations

import time

from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import (
    check_finite_losses,
    grads_of,
    initial_state,
    unroll,
    validation_loss,
)
from hyperdiff.methods.base import HyperGradient, Method, finish


def _reverse(problem: Problem, raw: dict[str, Tensor]) -> HyperGradient:
    started = time.perf_counter()
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    hview = problem.hparams.view(leaves)
    state = initial_state(problem, differentiable=True)
    state, losses = unroll(problem, hview, state, differentiable=True)
    check_finite_losses(losses, "reverse")
    value = validation_loss(problem, state.params, state.buffers, hview)
    grad = grads_of(value, leaves, create_graph=False)
    return finish(
        problem, leaves, method="reverse", value=value, grad=grad, params=state.params,
        buffers=state.buffers, train_losses=losses, started=started,
    )


def reverse() -> Method:
    """Exact hypergradient by backpropagating through all inner steps (memory O(T))."""
    return Method("reverse", _reverse)
