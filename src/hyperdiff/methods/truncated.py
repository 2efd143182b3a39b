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
(:func:`~hyperdiff.methods.reverse.reverse_segment`, ``backprop=K``).
"""

from __future__ import annotations

import time
from functools import partial

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
)
from hyperdiff.errors import HyperdiffError, positive_int
from hyperdiff.methods.base import Capabilities, HyperGradient, Method, finish
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


def _truncated(problem: Problem, raw: dict[str, Tensor], k: int) -> HyperGradient:
    started = time.perf_counter()
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
    if start == 0:
        state, prefix_losses = initial_state(problem, hview, differentiable=True), None
    else:
        state, prefix_losses = _frozen_prefix(problem, raw, start)
        check_finite_losses(prefix_losses, "truncated")
    state, losses = unroll(problem, hview, state, start=start, differentiable=True)
    check_finite_losses(losses, "truncated", start)
    if prefix_losses is not None:
        losses = torch.cat([prefix_losses, losses])
    value = validation_loss(problem, state.params, state.buffers, hview)
    grad = grads_of(value, leaves, create_graph=False)
    return finish(
        problem, leaves, method="truncated", value=value, grad=grad, params=state.params,
        buffers=state.buffers, train_losses=losses, started=started,
        k=k, differentiated_steps=problem.steps - start,
    )


def truncated(k: int) -> Method:
    """Biased hypergradient by backpropagating through the last ``k`` inner steps only.

    Memory O(k) steps; ignores how the state at step ``T - k`` depends on the
    hyperparameters (``diagnostics["differentiated_steps"]`` says how many steps were
    differentiated). ``k >= T`` gives the exact reverse-mode hypergradient.

    Args:
        k: number of final steps to differentiate, ``k >= 1``.

    Raises:
        HyperdiffError: ``k`` is not a positive int.
    """
    k = positive_int("truncated", "k", k)
    return Method("truncated", lambda problem, raw: _truncated(problem, raw, k), {"k": k},
                  capabilities=CAPABILITIES, segment_fn=partial(reverse_segment, backprop=k),
                  samples_fn=partial(reverse_samples, backprop=k))
