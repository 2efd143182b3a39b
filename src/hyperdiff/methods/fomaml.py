"""First-order MAML: the query loss's gradient at the adapted parameters, taken for theta_0.

For a problem whose initialization theta_0 is a hyperparameter (``hd.initialization``), the
exact meta-gradient is ``dL_val(theta_T)/dtheta_0 = (dtheta_T/dtheta_0)^T grad L_val(theta_T)``;
first-order MAML (Finn et al. 2017, section 5.2) drops the Jacobian of training
(``dtheta_T/dtheta_0 ~ I``, no second-order terms)::

    g_theta0 = grad_theta L_val(theta_T)          (the adapted parameters' gradient)
    g_other  = dL_val/du |direct                  (other hyperparameters: only their direct
                                                   part, no path through training: usually 0)

Training runs once without a graph and the gradient costs one backward pass of the validation
loss: time about that of plain training, memory O(params), independent of T. Its error
against the exact hypergradient grows with T and the learning rate (``hd.check`` reports it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import (
    check_finite_losses,
    flat,
    initial_state,
    unroll,
    validation_loss,
    zeros_for_unused,
)
from hyperdiff.errors import HyperdiffError
from hyperdiff.methods.base import Capabilities, HyperGradient, Method, finish
from hyperdiff.typing import Params

CAPABILITIES = Capabilities(exact=False, offline=True)

InitialGrad = Callable[[Params, Params, Params], Params]
"""``(theta_0, theta_T, grad L_val(theta_T)) -> g_theta0`` by parameter name."""


def first_order(problem: Problem, raw: dict[str, Tensor], method: str,
                initial_grad: InitialGrad) -> HyperGradient:
    """Train ``[0, T)`` without a graph from theta_0; the validation loss at theta_T, its
    direct hypergradient, and ``initial_grad(theta_0, theta_T, grad L_val(theta_T))`` added to
    the initialization's entry (flat, in its parameters' order)."""
    started = time.perf_counter()
    name = problem.initialization
    if name is None:
        raise HyperdiffError(
            f"{method}: problem must tune its initialization (hd.initialization(params) among "
            "its hyperparameters; a first-order meta-gradient is one of theta_0) (got the "
            f"hyperparameters {list(problem.hparams)})")
    with torch.no_grad():
        start = initial_state(problem, problem.hparams.view(problem.raw_tensors(raw)),
                              differentiable=False)
        end, losses = unroll(problem, problem.hparams.view(problem.raw_tensors(raw)),
                             start, differentiable=False)
    check_finite_losses(losses, method)
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    adapted = {k: v.detach().requires_grad_() for k, v in end.params.items()}
    value = validation_loss(problem, adapted, end.buffers, problem.hparams.view(leaves))
    inputs = [*leaves.values(), *adapted.values()]
    grads = zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True), inputs)
    grad = dict(zip(leaves, grads[:len(leaves)], strict=True))
    at_end = dict(zip(adapted, grads[len(leaves):], strict=True))
    theta0 = {k: v.detach() for k, v in start.params.items()}
    extra = initial_grad(theta0, {k: v.detach() for k, v in end.params.items()}, at_end)
    order = problem.hparams[name].param_names  # type: ignore[attr-defined]
    grad[name] = grad[name] + flat(extra[k] for k in order).to(grad[name])
    return finish(problem, leaves, method=method, value=value, grad=grad, params=end.params,
                  buffers=end.buffers, train_losses=losses, started=started)


def _fomaml(problem: Problem, raw: dict[str, Tensor]) -> HyperGradient:
    return first_order(problem, raw, "fomaml", lambda theta0, theta_t, g_t: g_t)


def fomaml() -> Method:
    """First-order MAML: ``grad L_val(theta_T)`` as theta_0's hypergradient (module doc)."""
    return Method("fomaml", _fomaml, capabilities=CAPABILITIES)


__all__ = ["CAPABILITIES", "first_order", "fomaml"]
