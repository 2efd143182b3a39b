"""Inner training of a batch of same-shaped tasks as one vmapped computation.

The ``m`` tasks of a meta step are problems that differ only in their data: the same model,
losses, hyperparameters, inner optimizer and steps. When each task's training batch is fixed
(:class:`~hyperdiff.engine.data.FullBatch`, the support set, also moved to a device) and the
tasks' batches have equal shapes, they are *stackable*: parameters ``P_t``, optimizer states
and a copy ``U`` of the raw hyperparameters per task get a leading task axis of size ``m``, the
data too, and every inner step runs once for all tasks instead of ``m`` times::

    L(P_t)  = sum_i L_train(P_t[i], U[i]; support_i)      (torch.func.vmap over i)
    G_t     = dL/dP_t                                       row i = grad L_train of task i alone
    P_t+1   = vmap(update)(G_t, S_t, P_t, U)                (task i's loss reads row i only)
    values  = vmap(L_val)(P_T, U; query)                    (m,)

so ``d values.sum() / dU`` holds task ``i``'s hypergradient in row ``i``: the arithmetic of the
per-task loop, in batched kernels (one Python-driven graph instead of ``m``). Autograd runs
outside vmap (``create_graph`` through the batched ops), so every method built on
:func:`batched_unroll` keeps plain reverse-mode semantics. Randomness a loss draws is the same
for every task (``randomness="same"``), as in the loop, where every task replays the step's
seed.

>>> import torch, hyperdiff as hd
>>> p = {"w": torch.zeros(1)}
>>> base = hd.make_problem(lambda q, h, b: ((q["w"] * b[0] - b[1]) ** 2).mean(),
...                        lambda q, h, b: ((q["w"] * b[0] - b[1]) ** 2).mean(),
...                        hd.HyperParameters(theta0=hd.initialization(p)), p,
...                        optimizer=hd.sgd(0.1), train_data=(torch.ones(3, 1), torch.ones(3, 1)),
...                        val_data=(torch.ones(2, 1), torch.ones(2, 1)), steps=2)
>>> from dataclasses import replace
>>> tasks = stack_tasks([base, replace(base, val_data=[(torch.ones(2, 1), torch.zeros(2, 1))])])
>>> tasks.size, tuple(tasks.support[0].shape)
(2, (2, 3, 1))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.engine.data import FullBatch
from hyperdiff.engine.device import unwrap
from hyperdiff.engine.models import StepContext
from hyperdiff.engine.problem import Problem, call_loss
from hyperdiff.engine.training import TrainState, grads_of, validation_loss
from hyperdiff.tree import tree_flatten, tree_unflatten
from hyperdiff.typing import Batch, Params

DATA_FIELDS = ("train_data", "val_data")
"""The fields of a :class:`Problem` that may differ between stackable tasks."""


class TaskBatch(NamedTuple):
    """``size`` stackable tasks (module doc): ``problems`` as given, their training batches
    stacked on a new first axis (``support``) and each validation batch likewise (``query``)."""

    problems: tuple[Problem, ...]
    support: Batch
    query: list[Batch]

    @property
    def size(self) -> int:
        return len(self.problems)

    @property
    def template(self) -> Problem:
        """The first task: everything but the data is every task's."""
        return self.problems[0]


def stack_batches(batches: Sequence[Batch]) -> Batch | None:
    """``batches`` (one per task) stacked leaf by leaf on a new first axis, or ``None`` when
    their structures, shapes, dtypes or devices differ or a leaf is not a tensor."""
    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        return None
    stacked = []
    for column in zip(*(leaves for leaves, _ in flat), strict=True):
        first = column[0]
        if not all(isinstance(x, Tensor) and x.shape == first.shape and x.dtype == first.dtype
                   and x.device == first.device for x in column):
            return None
        stacked.append(torch.stack(column))
    return tree_unflatten(stacked, spec)


def stack_tasks(problems: Sequence[Problem]) -> TaskBatch | None:
    """The tasks as one :class:`TaskBatch`, or ``None`` where they cannot run as one batched
    computation: fewer than two, a training source other than one fixed batch, model buffers
    (BatchNorm statistics), anything but the data differing, or data of unequal shapes."""
    if len(problems) < 2:
        return None
    first = problems[0]
    shared = [f.name for f in fields(Problem) if f.name not in DATA_FIELDS]
    if first.buffers or any(
            not isinstance(unwrap(p.train_data), FullBatch)
            or len(p.val_data) != len(first.val_data)
            or not all(_same(getattr(p, name), getattr(first, name)) for name in shared)
            for p in problems):
        return None
    support = stack_batches([p.train_data.batch(0, p.seed) for p in problems])
    query = [stack_batches([p.val_data[j] for p in problems]) for j in range(len(first.val_data))]
    if support is None or any(q is None for q in query):
        return None
    return TaskBatch(tuple(problems), support, query)  # type: ignore[arg-type]


def _same(a: Any, b: Any) -> bool:
    """The same object, dicts of the same objects (parameters a task's move to the template's
    device left as they were), or equal numbers (steps, seeds, flags)."""
    if a is b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    return isinstance(a, int) and isinstance(b, int) and a == b


def task_leaves(raw: dict[str, Tensor], size: int) -> dict[str, Tensor]:
    """One copy of the raw values per task, ``(size, *shape)``, as leaves that require grad:
    ``d(sum_i f_i)/dU`` then holds task ``i``'s gradient in row ``i``."""
    return {n: v.detach().unsqueeze(0).repeat(size, *(1,) * v.dim()).requires_grad_()
            for n, v in raw.items()}


def _vmap(fn: Any, *args: Any) -> Any:
    return torch.func.vmap(fn, randomness="same")(*args)


def batched_initial_state(tasks: TaskBatch, leaves: dict[str, Tensor]) -> TrainState:
    """theta_0 of every task ``(m, *shape)`` with the graph to ``leaves`` (an initialization
    hyperparameter), else fresh leaves, and the optimizer's initial states, stacked."""
    problem = tasks.template
    name = problem.initialization
    if name is None:
        params = {k: v.detach().unsqueeze(0).repeat(tasks.size, *(1,) * v.dim())
                  .requires_grad_() for k, v in problem.params.items()}
    else:
        params = _vmap(lambda u: {k: problem.hparams.view(u).at(name, param=k).to(v.dtype)
                                  for k, v in problem.params.items()}, leaves)
    return TrainState(params, {}, _vmap(problem.optimizer.init, params))


def batched_train_step(tasks: TaskBatch, state: TrainState, leaves: dict[str, Tensor],
                       step: int, *, differentiable: bool = True) -> tuple[TrainState, Tensor]:
    """One inner step of every task (module doc), with its graph when ``differentiable``
    (else plain training, as :func:`~hyperdiff.engine.training.train_step`); the tasks'
    train losses ``(m,)`` at ``P_t``, detached."""
    problem, params = tasks.template, state.params
    if not differentiable:
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        leaves = {n: v.detach() for n, v in leaves.items()}
    ctx = StepContext(step=step, seed=problem.seed, train=True, buffers={})

    def loss(p: Params, u: dict[str, Tensor], batch: Batch) -> Tensor:
        return call_loss(problem, "train_loss", p, problem.hparams.view(u), batch, ctx)

    with torch.enable_grad():
        losses = _vmap(loss, params, leaves, tasks.support)
        grads = grads_of(losses.sum(), params, create_graph=differentiable)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        new_params, opt_state = _vmap(
            lambda g, s, p, u: problem.optimizer.update(g, s, p, problem.hparams.view(u), step),
            grads, state.opt_state, params if differentiable else _detached(params), leaves)
    return TrainState(new_params, {}, opt_state), losses.detach()


def _detached(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}


def batched_unroll(tasks: TaskBatch, leaves: dict[str, Tensor], *, differentiable: bool = True
                   ) -> tuple[TrainState, Tensor]:
    """All ``T`` inner steps of every task from theta_0 (with their graph when
    ``differentiable``); the state at ``T`` and the train losses ``(m, T)``."""
    state = batched_initial_state(tasks, leaves)
    if not differentiable:
        state = TrainState(_detached(state.params), {}, state.opt_state)
    losses = []
    for step in range(tasks.template.steps):
        state, loss = batched_train_step(tasks, state, leaves, step,
                                         differentiable=differentiable)
        losses.append(loss)
    return state, torch.stack(losses, dim=1).to(tasks.template.hparam_dtype)


def batched_validation_loss(tasks: TaskBatch, params: Params, leaves: dict[str, Tensor]
                            ) -> Tensor:
    """Every task's validation loss on its query batches at its ``params`` row, ``(m,)``."""
    problem = tasks.template

    def loss(p: Params, u: dict[str, Tensor], query: list[Batch]) -> Tensor:
        return validation_loss(replace(problem, val_data=query), p, {}, problem.hparams.view(u))

    return _vmap(loss, params, leaves, tasks.query)


def row(tree: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """Task ``i``'s entries of a stacked dict, detached."""
    return {k: v[i].detach() for k, v in tree.items()}


__all__ = ["DATA_FIELDS", "TaskBatch", "batched_initial_state", "batched_train_step",
           "batched_unroll", "batched_validation_loss", "row", "stack_batches", "stack_tasks",
           "task_leaves"]
