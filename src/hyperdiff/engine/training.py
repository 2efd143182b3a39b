"""Inner training: one optimizer step, the unrolled run, and the validation loss.

``train_step`` is the single definition of a training step used by every autograd-based
method: differentiable (the graph is kept for reverse mode) or not (plain training, finite
differences, replay).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.engine.data.evaluation import sample_weights
from hyperdiff.engine.models import StepContext
from hyperdiff.engine.problem import Problem, call_loss, sum_in_order
from hyperdiff.errors import NonFiniteError
from hyperdiff.hparams.hyperparams import HParamView
from hyperdiff.typing import Params


class TrainState(NamedTuple):
    """Parameters, buffers and optimizer state after some inner steps."""

    params: Params
    buffers: Params
    opt_state: Any


def initial_state(problem: Problem, hview: HParamView | None = None, *,
                  differentiable: bool) -> TrainState:
    """theta_0, buffers, optimizer state.

    theta_0 is ``problem.params`` (fresh leaves, requiring grad when ``differentiable``), or,
    for a problem with an initialization hyperparameter, its value in ``hview`` (default: the
    hyperparameters' current values), cast to each parameter's dtype: attached to ``hview``'s
    raw values when ``differentiable``, so that backpropagation reaches them.
    """
    name = problem.initialization
    if name is None:
        params = {k: v.detach().clone().requires_grad_(differentiable)
                  for k, v in problem.params.items()}
    else:
        hview = problem.hparams.view(problem.raw_tensors()) if hview is None else hview
        params = {k: _start_value(hview.at(name, param=k).to(v.dtype), differentiable)
                  for k, v in problem.params.items()}
    return TrainState(params, dict(problem.buffers), problem.optimizer.init(params))


def initial_vjp(problem: Problem, raw: dict[str, Tensor], adjoint: Params) -> list[Tensor]:
    """``a^T dtheta_0/du`` for an adjoint ``a`` of theta_0 (name -> tensor), one tensor per raw
    value (in ``raw``'s order; zeros for all but an initialization hyperparameter): the last
    piece of a backward pass that runs to the start of training (the optimizer state starts
    at zero, and buffers at the problem's, whatever ``u``)."""
    leaves = [v.detach().requires_grad_() for v in raw.values()]
    with torch.enable_grad():
        start = initial_state(problem, problem.hparams.view(dict(zip(raw, leaves, strict=True))),
                              differentiable=True).params
        used = [n for n in start if start[n].requires_grad]
        grads = torch.autograd.grad([start[n] for n in used], leaves, [adjoint[n] for n in used],
                                    allow_unused=True) if used else (None,) * len(leaves)
    return zeros_for_unused(grads, leaves)


def _start_value(value: Tensor, differentiable: bool) -> Tensor:
    """``value`` as a start of training: with its graph when ``differentiable`` (a fresh leaf
    that requires grad if it has none), else a detached copy."""
    if differentiable and value.requires_grad:
        return value
    return value.detach().clone().requires_grad_(differentiable)


def flat(tensors: Iterable[Tensor]) -> Tensor:
    """The entries of ``tensors`` concatenated in order, one 1-D tensor (a new one: ``cat``
    copies; a 1-D tensor goes in as it is, without a reshape's dispatch, as the curvature
    tangents flatten every parameter tensor at every step)."""
    return torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors])


def zeros_for_unused(grads: tuple[Tensor | None, ...], like: list[Tensor]) -> list[Tensor]:
    """``torch.autograd.grad(..., allow_unused=True)`` results with zeros in place of None."""
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like, strict=True)]


def grads_of(loss: Tensor, params: Params, *, create_graph: bool) -> Params:
    """d loss / d params as a dict; zeros for parameters the loss does not use."""
    inputs = list(params.values())
    grads = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
    return dict(zip(params, zeros_for_unused(grads, inputs), strict=True))


def train_gradient(problem: Problem, params: Params, buffers: Params, hview: HParamView,
                   step: int, *, create_graph: bool) -> tuple[Params, Params, Tensor]:
    """``grad L_train(theta_t, lam; batch_t)`` at ``params`` (which must require grad), the
    buffers after the forward pass (BatchNorm statistics) and the train loss (attached)."""
    batch = problem.train_data.batch(step, problem.seed)
    ctx = StepContext(step=step, seed=problem.seed, train=True, buffers=buffers)
    with torch.enable_grad():
        loss = call_loss(problem, "train_loss", params, hview, batch, ctx)
        grads = grads_of(loss, params, create_graph=create_graph)
    return grads, {**buffers, **ctx.new_buffers}, loss


def train_step(
    problem: Problem,
    params: Params,
    buffers: Params,
    opt_state: Any,
    hview: HParamView,
    step: int,
    *,
    differentiable: bool,
) -> tuple[Params, Params, Any, Tensor]:
    """One inner step: ``theta_{t+1} = update(grad L_train(theta_t, lam, batch_t), ...)``.

    Returns new params, buffers, optimizer state and the (detached) train loss at theta_t.
    """
    if not differentiable:
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
    grads, new_buffers, loss = train_gradient(problem, params, buffers, hview, step,
                                              create_graph=differentiable)
    if differentiable:
        new_params, new_state = problem.optimizer.update(grads, opt_state, params, hview, step)
    else:
        with torch.no_grad():
            params = {k: v.detach() for k, v in params.items()}
            new_params, new_state = problem.optimizer.update(grads, opt_state, params, hview, step)
        new_buffers = {k: v.detach() for k, v in new_buffers.items()}
    return new_params, new_buffers, new_state, loss.detach()


def unroll(
    problem: Problem,
    hview: HParamView,
    state: TrainState,
    *,
    start: int = 0,
    stop: int | None = None,
    differentiable: bool,
) -> tuple[TrainState, Tensor]:
    """Run steps ``start .. stop-1`` from ``state``; return the new state and the losses."""
    stop = problem.steps if stop is None else stop
    # one preallocated buffer: keeping T small loss tensors alive would pin heap pages
    # between the steps' large temporaries (several MB of RSS at T = 1000)
    losses = torch.empty(max(stop - start, 0), dtype=problem.hparam_dtype, device=problem.device)
    params, buffers, opt_state = state
    for step in range(start, stop):
        params, buffers, opt_state, loss = train_step(
            problem, params, buffers, opt_state, hview, step, differentiable=differentiable
        )
        losses[step - start] = loss
    return TrainState(params, buffers, opt_state), losses


def validation_loss(problem: Problem, params: Params, buffers: Params, hview: HParamView) -> Tensor:
    """Mean validation loss over the validation batches, model in eval mode; batches of
    different sizes are weighted by their sample counts (``sum_b n_b L_b / sum_b n_b``)."""
    losses = [
        call_loss(problem, "val_loss", params, hview, batch,
                  StepContext(step=-1, seed=problem.seed, train=False, buffers=buffers))
        for batch in problem.val_data
    ]
    weights = sample_weights(problem.val_data)
    if weights is not None:
        return sum_in_order([w * loss for w, loss in zip(weights, losses, strict=True)])
    return sum_in_order(losses) / len(losses)


def check_finite_losses(losses: Tensor, method: str, start: int = 0) -> None:
    """Raise :class:`NonFiniteError` naming the first inner step whose loss is not finite."""
    bad = (~torch.isfinite(losses)).nonzero()
    if bad.numel():
        step = int(bad[0, 0]) + start
        raise NonFiniteError(
            f"{method}: inner training diverged at step {step} (train loss "
            f"{float(losses[bad[0, 0]])}); lower the learning rate or the number of steps"
        )


def train(problem: Problem, raw: dict[str, Tensor] | None = None) -> tuple[TrainState, Tensor]:
    """Plain (non-differentiable) training for ``problem.steps`` steps at ``raw``."""
    hview = problem.hparams.view(problem.raw_tensors(raw))
    with torch.no_grad():
        state = initial_state(problem, hview, differentiable=False)
    return unroll(problem, hview, state, differentiable=False)
