"""One function per window hypergradient of online tuning.

Online tuning trains one run of N inner steps, ``s_{t+1} = Phi_t(s_t, lam)`` (``s`` the
parameters, buffers and optimizer state), and every K steps takes a hypergradient over the
window ``[t0, t1)`` just trained, at the validation batch ``B`` drawn for that hyper-step:

- :func:`reverse_window`: backpropagate ``L_val(theta_{t1}; B)`` through the K steps of the
  window only, treating ``s_{t0}`` as a constant: ``dL/dlam = dL/dlam|direct + dL/ds_{t1} *
  sum_{t0<=t<t1} (prod_{t<j<t1} dPhi_j/ds) dPhi_t/dlam``. K=1 with SGD is hypergradient descent
  (Baydin et al. 2018): for the learning rate, ``dL/dlr = -<grad L_val(theta_{t+1}),
  grad L_train(theta_t)>``.
- :func:`forward_window`: carry the tangents ``Z_t = ds_t/dlam`` from the start of the run
  across windows (real-time forward mode, RTHO; Franceschi et al. 2017):
  ``Z_{t+1} = dPhi_t/ds Z_t + dPhi_t/dlam``, ``dL/dlam = dL/dlam|direct + <dL/ds_{t1}, Z_{t1}>``.
  Exact for hyperparameters held fixed since step 0; memory independent of N.
- :func:`implicit_window`: train the window plainly, then the implicit function theorem at the
  current ``theta`` (Lorraine et al. 2020): ``H v = dL_val/dtheta`` with ``H`` the Hessian of
  ``L_train`` on the window's last training batch, solved by CG or a Neumann series, and
  ``dL/dlam = dL/dlam|direct - (d^2 L_train / dlam dtheta)^T v``. Hyperparameters that act only
  through the optimizer (learning rates, momentum) get 0: use it for those of the loss.

Each returns a :class:`Window`; all take and return detached states.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.engine.models import StepContext
from hyperdiff.engine.problem import Problem, call_loss
from hyperdiff.engine.solvers import Solver
from hyperdiff.engine.training import (
    TrainState,
    check_finite_losses,
    flat,
    grads_of,
    unroll,
    validation_loss,
    zeros_for_unused,
)
from hyperdiff.methods.forward import propagate
from hyperdiff.typing import Batch


class Window(NamedTuple):
    """The outcome of one window: the state at its end, the raw hypergradient ``dL/du``, the
    validation loss, the window's train losses, forward-mode tangents, diagnostics."""

    state: TrainState
    grad: dict[str, Tensor]
    value: float
    train_losses: Tensor
    tangent: Any = None
    diagnostics: dict[str, Any] | None = None


def _detach(tree: Any) -> Any:
    """``tree`` (tensors in dicts, tuples, NamedTuples) with every tensor detached."""
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        items = [_detach(v) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    if isinstance(tree, list):
        return [_detach(v) for v in tree]
    return tree


def _detached(state: Any) -> TrainState:
    params, buffers, opt_state = state
    return TrainState(_detach(params), _detach(buffers), _detach(opt_state))


def _val_problem(problem: Problem, val_batches: list[Batch]) -> Problem:
    return replace(problem, val_data=val_batches)


def reverse_window(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                   stop: int, val_batches: list[Batch], backprop: int | None = None) -> Window:
    """Train steps ``start .. stop-1`` with their graph and backpropagate the validation loss
    at the end through them (module doc); with ``backprop = k`` only the last k steps keep
    their graph (the first ones are trained plainly, as a constant start)."""
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    hview = problem.hparams.view(leaves)
    plain = stop - min(stop - start, backprop or stop - start)
    if plain > start:
        with torch.no_grad():
            state, first = unroll(problem, problem.hparams.view(problem.raw_tensors(raw)), state,
                                  start=start, stop=plain, differentiable=False)
        check_finite_losses(first, "online reverse", start)
        window = reverse_window(problem, state, raw, plain, stop, val_batches)
        return window._replace(train_losses=torch.cat([first, window.train_losses]))
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    begin = TrainState(params, dict(state.buffers), state.opt_state)
    end, losses = unroll(problem, hview, begin, start=start, stop=stop, differentiable=True)
    check_finite_losses(losses, "online reverse", start)
    value = validation_loss(_val_problem(problem, val_batches), end.params, end.buffers, hview)
    grad = grads_of(value, leaves, create_graph=False)
    return Window(_detached(end), grad, float(value.detach()), losses)


def forward_window(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                   stop: int, val_batches: list[Batch], tangent: Any, *,
                   engine: str = "double_vjp") -> Window:
    """Carry ``(s, Z)`` through steps ``start .. stop-1`` at ``raw`` and contract the validation
    gradient at the end with ``Z`` (module doc). ``tangent=None`` at the start of the run."""
    end, tangent, losses = propagate(problem, raw, state, tangent, start, stop, engine=engine)
    check_finite_losses(losses, "online forward", start)
    params, buffers, opt_state = end
    theta = {k: v.detach().requires_grad_() for k, v in params.items()}
    bufs = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in buffers.items()}
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    value = validation_loss(_val_problem(problem, val_batches), theta, bufs,
                            problem.hparams.view(leaves))
    tracked = [*theta.values(), *[b for b in bufs.values() if b.requires_grad]]
    z_state = [*tangent[0].values(), *[tangent[1][k] for k, b in bufs.items() if b.requires_grad]]
    inputs = [*tracked, *leaves.values()]
    grads = zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True), inputs)
    hp = problem.hparams
    indirect = sum(z.reshape(z.shape[0], -1) @ g.reshape(-1)
                   for g, z in zip(grads[: len(tracked)], z_state, strict=True))
    direct = hp.flatten(dict(zip(leaves, grads[len(tracked):], strict=True)))
    grad = hp.unflatten(direct + indirect)
    return Window(TrainState(params, buffers, opt_state), grad, float(value.detach()), losses,
                  tangent)


def implicit_window(problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                    stop: int, val_batches: list[Batch], solver: Solver) -> Window:
    """Train steps ``start .. stop-1`` plainly, then one implicit-function solve at the current
    parameters with the Hessian of the last training batch's loss (module doc)."""
    hp = problem.hparams
    with torch.no_grad():
        end, losses = unroll(problem, hp.view(problem.raw_tensors(raw)), state, start=start,
                             stop=stop, differentiable=False)
    check_finite_losses(losses, "online implicit", start)
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    hview = hp.view(leaves)
    theta = {k: v.detach().requires_grad_() for k, v in end.params.items()}
    theta_list = list(theta.values())
    with torch.enable_grad():
        value = validation_loss(_val_problem(problem, val_batches), theta, end.buffers, hview)
        inputs = [*theta_list, *leaves.values()]
        grads = zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True), inputs)
        rhs = flat(grads[: len(theta_list)])
        direct = hp.flatten(dict(zip(leaves, grads[len(theta_list):], strict=True)))
        batch = problem.train_data.batch(stop - 1, problem.seed)
        ctx = StepContext(step=stop - 1, seed=problem.seed, train=True, buffers=end.buffers)
        train = call_loss(problem, "train_loss", theta, hview, batch, ctx)
        g = flat(grads_of(train, theta, create_graph=True).values())

        def hvp(v: Tensor) -> Tensor:
            out = torch.autograd.grad(g, theta_list, v, retain_graph=True, allow_unused=True)
            return flat(zeros_for_unused(out, theta_list))

        result = solver(hvp, rhs.detach(), warn=False)
        mixed = torch.autograd.grad(g, list(leaves.values()), result.x, allow_unused=True)
    indirect = -hp.flatten(dict(zip(leaves, zeros_for_unused(mixed, list(leaves.values())),
                                    strict=True)))
    diagnostics = {"iterations": result.iterations, "residual": result.residual,
                   "converged": result.converged}
    return Window(_detached(end), hp.unflatten(direct + indirect), float(value.detach()),
                  losses, None, diagnostics)


__all__ = ["Window", "forward_window", "implicit_window", "reverse_window"]
