"""The report of a meta run: post-adaptation query loss (and accuracy) on held-out tasks.

Held-out task ``j`` (``j < outer.meta_test_tasks``) is ``tasks.sample(j, seed_j)`` with
``seed_j = task_seed(REPORT_SEED, j, "meta-test")`` (:mod:`hyperdiff.seeds`), a stream that
meta-training (``task_seed(outer.seed, index, "meta")``) never draws from, so a distribution
that draws its task from ``seed`` gives tasks that training never saw. At each reported value
(the initial theta_0 and the tuned one) every held-out task trains the task's template problem
on its support set for T steps and is scored on its query set::

    L_query(j, u) = L_val(theta_T(u; support_j); query_j)      mean and std over j

with every other metric of the task's ``metrics`` (``accuracy`` for classification) on the same
query set beside it (``query_accuracy``).

The pre-training baseline (:func:`pretrained_start`, for a task that tunes an initialization)
uses the same tasks that meta-training drew: for each outer step ``s``, one Adam step (the run's
outer learning rate) on the validation loss over the support and query sets of step ``s``'s
tasks; its parameters are then the theta_0 adapted on the held-out tasks (``pretrained``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor

from hyperdiff.app.tasks.base import Metrics, Task
from hyperdiff.app.tasks.metrics import split_metrics
from hyperdiff.engine.models import StepContext
from hyperdiff.engine.problem import Problem, takes_context
from hyperdiff.engine.task_distribution import adapted, adapted_query_loss
from hyperdiff.engine.training import validation_loss
from hyperdiff.errors import HyperdiffError
from hyperdiff.hparams.initialization import initial_values
from hyperdiff.seeds import REPORT_SEED, meta_task, task_seed
from hyperdiff.tuner.distributed.spread import Spreader

STREAM = "meta-test"


def held_out_tasks(count: int) -> list[tuple[int, int]]:
    """``(index, seed)`` of the ``count`` held-out tasks (module doc)."""
    return [(j, task_seed(REPORT_SEED, j, STREAM)) for j in range(count)]


def adapted_query_metrics(problem: Problem, raw: Mapping[str, Tensor],
                          metrics: Metrics | None = None) -> dict[str, float]:
    """``{"query_loss": L_val(theta_T), "query_<name>": ...}`` after training ``problem``
    (one task) at ``raw``, without a graph: every metric of ``metrics`` but its ``loss`` on
    the query set (eval mode), averaged over its samples."""
    state, hview = adapted(problem, raw)
    with torch.no_grad():
        out = {"query_loss": float(validation_loss(problem, state.params, state.buffers,
                                                   hview))}
        if metrics is not None:
            ctx = StepContext(step=-1, seed=problem.seed, train=False, buffers=state.buffers)
            values = split_metrics(metrics, takes_context(metrics, "metrics"), state.params,
                                   hview, problem.val_data, ctx)
            out |= {f"query_{key}": value for key, value in values.items() if key != "loss"}
        return out


def _metrics_at(raw: Mapping[str, Tensor], metrics: Metrics, problem: Problem
                ) -> dict[str, float]:
    return adapted_query_metrics(problem, raw, metrics)


def pretrained_start(task: Task, raw: Mapping[str, Tensor], *, steps: int, batch: int,
                     seed: int, lr: float) -> dict[str, Tensor] | None:
    """``raw`` with theta_0 pre-trained on the meta run's tasks (module doc); ``None`` for a
    task without an initialization hyperparameter."""
    base, name = task.problems[0], task.problems[0].initialization
    if name is None or task.tasks is None:
        return None
    start = dict(raw)
    params = {k: v.to(base.params[k]).detach().requires_grad_()
              for k, v in initial_values(base.hparams.with_raw(start), name).items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    hview = base.hparams.view(base.raw_tensors(start))
    for step in range(steps):
        tasks = [task.tasks.problem(base, *meta_task(seed, step, batch, i))
                 for i in range(batch)]
        pooled = replace(base, val_data=[b for p in tasks
                                         for b in (p.train_data.batch(0, p.seed), *p.val_data)])
        optimizer.zero_grad()
        validation_loss(pooled, params, dict(base.buffers), hview).backward()
        optimizer.step()
    order = base.hparams[name].param_names  # type: ignore[attr-defined]
    start[name] = torch.cat([params[k].detach().reshape(-1) for k in order]).to(start[name])
    return start


def held_out_report(task: Task, values: Mapping[str, Mapping[str, Tensor]], count: int,
                    spread: Spreader) -> dict[str, dict[str, float]]:
    """``{label: {"query_loss": mean, "query_loss_std": std, "tasks": count}}`` for each
    labelled raw value of ``values`` (``"initial"``, ``"tuned"``), with the mean and std of
    every other metric of the task beside the loss (``query_accuracy``, ...)."""
    if task.tasks is None:
        raise HyperdiffError(f"{task.name}: the meta report needs the task's distribution "
                             "(hd.task(..., tasks=...)) (got none)")
    distribution, base = task.tasks, task.problems[0]
    problems = [distribution.problem(base, index, seed, held_out=True)
                for index, seed in held_out_tasks(count)]
    out: dict[str, dict[str, float]] = {}
    for label, raw in values.items():
        per_task = spread.map(partial(_metrics_at, raw, task.metrics), problems,
                              f"held-out tasks at the {label} values")
        out[label] = {}
        for key in per_task[0]:
            column = torch.tensor([m[key] for m in per_task], dtype=torch.float64, device="cpu")
            out[label] |= {key: float(column.mean()),
                           f"{key}_std": float(column.std()) if count > 1 else 0.0}
        out[label]["tasks"] = count
    return out


__all__ = ["STREAM", "adapted_query_loss", "adapted_query_metrics", "held_out_report",
           "held_out_tasks", "pretrained_start"]
