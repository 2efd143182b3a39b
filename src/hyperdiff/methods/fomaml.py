"""First-order MAML: the query loss's gradient at the adapted parameters, taken for theta_0.

For a problem whose initialization theta_0 is a hyperparameter (``hd.initialization``), the
exact meta-gradient is ``dL_val(theta_T)/dtheta_0 = (dtheta_T/dtheta_0)^T grad L_val(theta_T)``;
first-order MAML (Finn et al. 2017, section 5.2) drops the Jacobian of training
(``dtheta_T/dtheta_0 ~ I``, no second-order terms)::

    g_theta0 = grad_theta L_val(theta_T)          (the adapted parameters' gradient)
    g_other  = dL_val/du |direct                  (other hyperparameters: only their direct
                                                   part, no path through training)

so a hyperparameter that only training reads (the inner optimizer's learning rates, a
penalty of the training loss) would get 0 and never move: :func:`check_first_order` refuses
it.

Training runs once without a graph and the gradient costs one backward pass of the validation
loss: time about that of plain training, memory O(params), independent of T. The tasks of a
meta step with equal shapes train as one vmapped computation (:func:`first_order_batch`). Its error
against the exact hypergradient grows with T and the learning rate (``hd.check`` reports it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.models import StepContext
from hyperdiff.engine.problem import Problem, call_loss
from hyperdiff.engine.task_batch import (
    TaskBatch,
    batched_unroll,
    batched_validation_loss,
    row,
    task_leaves,
)
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
    _initialization(problem, method)
    with torch.no_grad():
        start = initial_state(problem, problem.hparams.view(problem.raw_tensors(raw)),
                              differentiable=False)
        end, losses = unroll(problem, problem.hparams.view(problem.raw_tensors(raw)),
                             start, differentiable=False)
    check_finite_losses(losses, method)
    leaves = {n: v.detach().requires_grad_() for n, v in raw.items()}
    adapted = {k: v.detach().requires_grad_() for k, v in end.params.items()}
    value = validation_loss(problem, adapted, end.buffers, problem.hparams.view(leaves))
    grad, at_end = _value_grads(value, leaves, adapted)
    theta0 = {k: v.detach() for k, v in start.params.items()}
    return _packaged(problem, leaves, method, initial_grad, value, grad, at_end, theta0,
                     end.params, end.buffers, losses, started)


def first_order_batch(tasks: TaskBatch, raw: dict[str, Tensor], method: str,
                      initial_grad: InitialGrad) -> list[HyperGradient]:
    """:func:`first_order` of every task, trained as one vmapped computation
    (:mod:`hyperdiff.engine.task_batch`): row ``i`` of each gradient is task ``i``'s."""
    started = time.perf_counter()
    problem = tasks.template
    _initialization(problem, method)
    with torch.no_grad():  # theta_0 is every task's: the same raw values
        theta0 = initial_state(problem, problem.hparams.view(raw), differentiable=False).params
    leaves = task_leaves(raw, tasks.size)
    end, losses = batched_unroll(tasks, leaves, differentiable=False)
    for task_losses in losses:
        check_finite_losses(task_losses, method)
    adapted = {k: v.detach().requires_grad_() for k, v in end.params.items()}
    values = batched_validation_loss(tasks, adapted, leaves)
    grad, at_end = _value_grads(values.sum(), leaves, adapted)
    return [_packaged(p, raw, method, initial_grad, values[i], row(grad, i), row(at_end, i),
                      theta0, row(end.params, i), p.buffers, losses[i], started,
                      batched=tasks.size)
            for i, p in enumerate(tasks.problems)]


def _initialization(problem: Problem, method: str) -> str:
    name = problem.initialization
    if name is None:
        raise HyperdiffError(
            f"{method}: problem must tune its initialization (hd.initialization(params) among "
            "its hyperparameters; a first-order meta-gradient is one of theta_0) (got the "
            f"hyperparameters {list(problem.hparams)})")
    return name


def optimizer_reads(problem: Problem) -> list[str]:
    """The tuned hyperparameters that the inner optimizer's coefficients read (a name, or a
    schedule's fields)."""
    names: set[str] = set()
    for coefficient in problem.optimizer.coefficients.values():
        if isinstance(coefficient, str):
            names.add(coefficient)
        elif isinstance(fields := getattr(coefficient, "names", None), dict):
            names.update(fields.values())
    return sorted(names & set(problem.hparams))


def validation_reads(problem: Problem) -> list[str]:
    """The hyperparameters that the validation loss reads directly: those its value on the
    first validation batch at theta_0 has a graph to (theta_0 itself enters through the
    parameters, not directly)."""
    leaves = {n: v.requires_grad_() for n, v in problem.raw_tensors().items()}
    with torch.enable_grad():
        start = initial_state(problem, problem.hparams.view(problem.raw_tensors()),
                              differentiable=False)
        value = call_loss(problem, "val_loss", start.params, problem.hparams.view(leaves),
                          problem.val_data[0], StepContext(step=-1, seed=problem.seed,
                                                           train=False, buffers=start.buffers))
        if not value.requires_grad:
            return []
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return [n for n, g in zip(leaves, grads, strict=True) if g is not None]


def check_first_order(method: str) -> Callable[[Problem], None]:
    """A ``Method.check``: refuse hyperparameters that only the inner optimizer reads (a
    learning rate, Meta-SGD's per-parameter rates), and any other but the initialization
    that the validation loss does not read (an L2 strength of the training loss): a
    first-order method gives them their direct part alone, zero, so a tuning loop would never
    move them."""
    def check(problem: Problem) -> None:
        if reads := optimizer_reads(problem):
            raise HyperdiffError(
                f"{method}: the hyperparameters {reads} are read by the inner optimizer, which "
                "a first-order method does not differentiate (their hypergradient is their "
                "direct part alone, 0), so they would never move; tune them with method "
                "'reverse' (MAML) or 'checkpointed', or make them constants")
        if problem.initialization is None:
            return  # refused when it runs (_initialization), as before any other check
        unread = sorted(set(problem.hparams) - {problem.initialization}
                        - set(validation_reads(problem)))
        if unread:
            raise HyperdiffError(
                f"{method}: tuned hyperparameters other than the initialization must be read "
                f"by the validation loss (got {unread}, which it does not read: a first-order "
                "method does not differentiate training, so their hypergradient is their "
                "direct part alone, 0, and they would never move); tune them with method "
                "'reverse' (MAML) or 'checkpointed', or make them constants")

    return check


def _value_grads(value: Tensor, leaves: Params, adapted: Params) -> tuple[Params, Params]:
    """``d value/d leaves`` and ``d value/d adapted`` (zeros where unused)."""
    inputs = [*leaves.values(), *adapted.values()]
    grads = zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True), inputs)
    return (dict(zip(leaves, grads[:len(leaves)], strict=True)),
            dict(zip(adapted, grads[len(leaves):], strict=True)))


def _packaged(problem: Problem, raw: dict[str, Tensor], method: str, initial_grad: InitialGrad,
              value: Tensor, grad: Params, at_end: Params, theta0: Params, theta_t: Params,
              buffers: Params, losses: Tensor, started: float, **diagnostics: Any
              ) -> HyperGradient:
    """``initial_grad(theta_0, theta_T, at_end)`` added to the initialization's entry of
    ``grad`` (flat, in its parameters' order), packaged by :func:`finish`."""
    name = _initialization(problem, method)
    extra = initial_grad(theta0, {k: v.detach() for k, v in theta_t.items()}, at_end)
    order = problem.hparams[name].param_names  # type: ignore[attr-defined]
    grad = {**grad, name: grad[name] + flat(extra[k] for k in order).to(grad[name])}
    return finish(problem, raw, method=method, value=value, grad=grad, params=theta_t,
                  buffers=buffers, train_losses=losses, started=started, **diagnostics)


def _adapted_grad(theta0: Params, theta_t: Params, g_t: Params) -> Params:
    return g_t


def fomaml() -> Method:
    """First-order MAML: ``grad L_val(theta_T)`` as theta_0's hypergradient (module doc)."""
    return Method("fomaml", partial_first_order(first_order, "fomaml", _adapted_grad),
                  capabilities=CAPABILITIES, check_fn=check_first_order("fomaml"),
                  batch_fn=partial_first_order(first_order_batch, "fomaml", _adapted_grad))


def partial_first_order(fn: Callable[..., Any], method: str, initial_grad: InitialGrad
                        ) -> Callable[..., Any]:
    """``fn(problem_or_tasks, raw)`` with the method's name and ``initial_grad`` bound."""
    return lambda target, raw: fn(target, raw, method, initial_grad)


__all__ = ["CAPABILITIES", "check_first_order", "first_order", "first_order_batch", "fomaml",
           "optimizer_reads", "partial_first_order", "validation_reads"]
