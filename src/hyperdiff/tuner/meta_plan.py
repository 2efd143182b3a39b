"""The meta plan: every outer step adapts on a batch of tasks drawn from a distribution.

Meta-learning (MAML and its variants) is hyperparameter optimization whose inner problem
changes every outer step: the problem's training split is a task's *support* set, its
validation split the task's *query* set, and the samples of a step are a batch of tasks. Outer
step ``s`` at raw values ``u_s``::

    for i < m:  (index, seed) = meta_task(loop seed, s, m, i)        (hyperdiff/seeds.py)
        support_i, query_i = tasks.sample(index, seed)
        train the problem's T steps on support_i from theta_0 (hd.initialization: the
        hyperparameter u), g_i = dL_query_i(theta_T)/du by the configured method
    g_s = mean_i g_i

so exact methods give the MAML meta-gradient, ``hd.methods.fomaml()`` / ``hd.methods.reptile()``
its first-order approximations, ``hd.implicit()`` with ``hd.proximal`` in the training loss
iMAML, and per-parameter learning rates as hyperparameters Meta-SGD. A method with a batched
form (``reverse``) adapts a rank's tasks of a step as one vmapped computation when they have
equal shapes (:mod:`hyperdiff.engine.task_batch`), one by one otherwise. The tasks of a step are a
pure function of ``(seed, step, i)``, so a resumed run draws the same tasks; they are spread
over the ranks of a process group as the offline plan's trainings are (each rank adapts the
tasks ``i`` with ``i % W == r``, and the gathered hypergradients are averaged in the order of
the single-process loop, so every rank takes the single-process step).

Each step's losses are of other tasks, so the step with the lowest batch loss is the luckiest
draw. With ``validation_tasks = n`` the plan ranks its steps on a fixed set instead: tasks
``(j, task_seed(loop seed, j, "meta-validation"))``, ``j < n``, drawn once from ``sample`` (a
seed stream that training never draws from), adapted at every step's ``u_s`` without a graph::

    L_sel(u_s) = mean_j L_query_j(theta_T(u_s; support_j))

the step's selection loss: the best step, early stopping and the result (the best step's
values) use it, and the same tasks every step make it comparable across steps. Without
validation tasks (or a selection split) the result is the final values and early stopping is
off. The checkpoint and the stopping rules are the offline plan's, less its ``travel``,
``extend`` and ``chaos_ratio`` (refused).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.task_distribution import (
    TaskDistribution,
    adapted_query_loss,
    task_distribution,
)
from hyperdiff.errors import (
    HyperdiffError,
    NonFiniteError,
    Text,
    fail,
    nonnegative_int,
    positive_int,
)
from hyperdiff.hparams.discrete import discrete_names
from hyperdiff.seeds import meta_task, task_seed
from hyperdiff.tuner.distributed.spread import Spreader, spreader_for
from hyperdiff.tuner.driver_checks import check_selection
from hyperdiff.tuner.history import OptimizeResult
from hyperdiff.tuner.offline_plan import OfflinePlan, offline_method, sampled_outcome
from hyperdiff.tuner.plan import Outcome, bind_once
from hyperdiff.tuner.sampler import Sampler
from hyperdiff.tuner.stopping import Stopping, ranking_name

VALIDATION_STREAM = "meta-validation"


class MetaPlan(OfflinePlan):
    """Every outer step trains on ``batch`` new tasks and averages their hypergradients.

    Args:
        tasks: the task distribution, ``hd.tasks.distribution(sample)`` or the function
            ``sample(index, seed) -> (support, query)`` itself
            (:mod:`hyperdiff.engine.task_distribution`).
        batch: tasks per outer step (the meta-batch ``m``).
        validation_tasks: fixed tasks on which every step's values are scored after
            adaptation, ranking the steps (module doc); 0: none, the result is the final
            values.

    The problem given to the loop is the template of every task: its model, losses,
    hyperparameters (usually ``hd.initialization``), inner optimizer and steps; its own
    training and validation data are used only to check the losses at the start.

    >>> import hyperdiff as hd
    >>> hd.plans.MetaPlan(lambda index, seed: (None, None), batch=4).batch
    4
    """

    # Adam, MAML's outer optimizer (signstep, the offline default, was measured on tuning
    # tasks, not on meta-learning: docs/driver.md)
    default_optimizer = "adam"
    reads_chaos = False  # ranks by loss: the rule was measured on tuning tasks (Stopping)

    def __init__(self, tasks: TaskDistribution | Any, batch: int = 1,
                 validation_tasks: int = 0):
        self.tasks = tasks if isinstance(tasks, TaskDistribution) else task_distribution(tasks)
        self.batch = positive_int("MetaPlan", "batch", batch)
        self.validation_tasks = nonnegative_int("MetaPlan", "validation_tasks",
                                                validation_tasks)
        self.validation: tuple[Problem, ...] = ()
        self._validation_drawn: list[tuple[int, int]] = []
        super().__init__(samples=self.batch, explore=0)  # no global phase over tasks

    def bind(self, loop: Any) -> None:
        """Check the problem (one template, no discrete hyperparameters) and the method."""
        bind_once(self, loop)
        if len(loop.problems) != 1:
            raise fail("MetaPlan", "problem", "one Problem, the template of every task (the "
                       "tasks take the place of cross-validation folds)",
                       Text(f"{len(loop.problems)} problems"))
        if names := discrete_names(loop.hparams):
            raise fail("MetaPlan", "hparams", "continuous hyperparameters only (discrete ones "
                       "are tuned by the offline and online plans)", names)
        method = offline_method(loop, "MetaPlan")
        if loop.selection is not None and self.validation_tasks:
            raise fail("MetaPlan", "selection", "None with validation_tasks (the validation "
                       "tasks rank the steps)", Text("a selection split"))
        if loop.selection is not None:  # none is usual: each step's tasks are new
            check_selection(loop.problems[0], loop.selection)
        self._check_stopping(loop.stopping, ranked=bool(self.validation_tasks)
                             or loop.selection is not None)
        self.problems = loop.problems
        self._validation_drawn = self.validation_indices(loop)
        self.validation = self._validation_problems(loop)
        self.spreader = spreader_for(method, loop.process_group)
        # the run's counters and (empty) warm slots, in the offline plan's checkpoint layout
        self._sampler = Sampler(loop.problems, method, samples=self.batch, auto=None,
                                seed=loop.seed, selection=loop.selection, warm_start=False,
                                discrete=None, spreader=self.spreader)

    @staticmethod
    def _check_stopping(stopping: Stopping, ranked: bool) -> None:
        """Refuse the rules the meta plan does not read: ``chaos_ratio``, ``travel`` and
        ``extend`` (the offline plan's), and ``patience`` without a ranking (validation tasks
        or a selection split), where early stopping is off (:meth:`stop_reason`)."""
        default = Stopping()
        for name in ("chaos_ratio", "travel", "extend"):
            if getattr(stopping, name) != getattr(default, name):
                raise fail("MetaPlan", f"stopping.{name}", f"{getattr(default, name)!r}, its "
                           "default (a rule of the offline plan, which the meta plan does not "
                           "read)", getattr(stopping, name))
        if not ranked and stopping.patience not in (None, default.patience):
            raise fail("MetaPlan", "stopping.patience", f"None or its default "
                       f"{default.patience} without validation_tasks or a selection split "
                       "(each step's loss is of other tasks, so early stopping is off: a run "
                       "of steps without a lower one is the draw's luck)", stopping.patience)

    def task_indices(self, loop: Any, step: int) -> list[tuple[int, int]]:
        """``(index, seed)`` of each task of outer ``step`` (:func:`~hyperdiff.seeds.meta_task`)."""
        return [meta_task(loop.seed, step, self.batch, i) for i in range(self.batch)]

    def validation_indices(self, loop: Any) -> list[tuple[int, int]]:
        """``(index, seed)`` of the fixed validation tasks (module doc)."""
        return [(j, task_seed(loop.seed, j, VALIDATION_STREAM))
                for j in range(self.validation_tasks)]

    def _validation_problems(self, loop: Any) -> tuple[Problem, ...]:
        try:
            return tuple(self.tasks.problem(self.problems[0], index, seed)
                         for index, seed in self.validation_indices(loop))
        except HyperdiffError as err:
            raise HyperdiffError(f"MetaPlan: validation tasks: {err}") from err

    def validation_loss(self, step: int, raw: dict[str, Tensor]) -> float:
        """``L_sel(raw)``: the mean query loss of the validation tasks adapted at ``raw``,
        spread over the ranks as the step's tasks are.

        Raises:
            NonFiniteError: the loss is not finite (an adaptation diverged).
        """
        names = [f"MetaPlan: outer step {step}: {self.tasks.name}: validation task {index} "
                 f"(seed {seed})" for index, seed in self._validation_drawn]
        losses = _Named(self.spreader, names).map(partial(_adapted_loss, raw), self.validation,
                                                  f"outer step {step} (validation tasks)")
        value = sum(losses) / len(losses)
        if not math.isfinite(value):
            raise NonFiniteError(f"the validation tasks' query loss is not finite ({value})")
        return value

    def evaluate(self, loop: Any, step: int, raw: dict[str, Tensor]) -> Outcome:
        """Adapt on each task of the step's batch at ``raw``; the mean hypergradient, and
        the validation tasks' loss at ``raw`` as the selection loss (``kept``) if any."""
        self.check_ranks(loop, raw)
        base, indices = self.problems[0], self.task_indices(loop, step)
        try:
            problems = tuple(self.tasks.problem(base, index, seed) for index, seed in indices)
        except HyperdiffError as err:
            raise HyperdiffError(f"MetaPlan: outer step {step}: {err}") from err
        names = [f"MetaPlan: outer step {step}: {self.tasks.name}: task {index} (seed {seed})"
                 for index, seed in indices]  # a task's failure names it
        tasks = Sampler(problems, self.sampler.method, samples=1, auto=None, seed=loop.seed,
                        selection=loop.selection, warm_start=False, discrete=None,
                        spreader=_Named(self.spreader, names), batched=True)
        outcome = sampled_outcome(loop, tasks, step, raw)
        outcome = outcome._replace(fields={**outcome.fields, "samples": self.batch})
        if self.validation:
            outcome = outcome._replace(kept=self.validation_loss(step, raw))
        return outcome

    def stop_reason(self, loop: Any) -> str | None:
        """The stopping rules; patience only with a ranking (a selection split or validation
        tasks): without one each step's loss is of other tasks, and a run of steps without a
        lower one is the draw's luck, not a plateau (the result is then the final values)."""
        ranked = bool(loop.selection or self.validation)
        return loop.stopping.reason(steps=loop.step_index, elapsed=self.elapsed(loop),
                                    since_best=loop.since_best if ranked else 0,
                                    has_selection=ranked)

    def result(self, loop: Any) -> OptimizeResult:
        """With validation tasks or a selection split the best step's values by that loss;
        else the final values (``criterion="final values"``): each step's losses are of other
        tasks, so the step with the lowest batch loss is the luckiest draw, not the best
        theta_0. The final values come from the last step's update and no step evaluated
        them: ``best_step`` is the step after the last (the one that would), ``best_loss``
        NaN."""
        ranked = super().result(loop)
        if self.validation:
            return replace(ranked, criterion=f"{ranking_name(loop.tie_steps, True)} of "
                           f"{self.validation_tasks} fixed validation tasks")
        if loop.selection is not None:  # ranked on the split, as early stopping was
            return ranked
        return replace(ranked, best_raw=ranked.final_raw,
                       best_hparams=loop.hparams.with_raw(ranked.final_raw),
                       best_step=int(loop.history[-1].step) + 1, best_loss=math.nan,
                       criterion="final values")

    def where(self, loop: Any) -> str:
        return f"meta step {loop.step_index}"


def _adapted_loss(raw: dict[str, Tensor], problem: Problem) -> float:
    return adapted_query_loss(problem, raw)


class _Named(Spreader):
    """``spreader`` whose items' errors name them: the bad input (a
    :class:`~hyperdiff.errors.HyperdiffError`, a loss that raised) of item ``i`` is raised
    again after ``names[i]``; a batch that fails is retried one item at a time to find it."""

    def __init__(self, spreader: Spreader, names: Sequence[str]):
        self.spreader, self.names = spreader, list(names)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], where: str,
            progress: Callable[[], None] | None = None) -> list[Any]:
        return self.spreader.map(partial(self._named, fn), list(enumerate(items)), where,
                                 progress)

    def map_batch(self, fn: Callable[[list[Any]], list[Any]], items: Sequence[Any],
                  where: str) -> list[Any]:
        def batch(pairs: list[tuple[int, Any]]) -> list[Any]:
            try:
                return fn([item for _, item in pairs])
            except HyperdiffError:
                for pair in pairs:  # which one: each alone, named
                    self._named(lambda item: fn([item]), pair)
                raise

        return self.spreader.map_batch(batch, list(enumerate(items)), where)

    def _named(self, fn: Callable[[Any], Any], pair: tuple[int, Any]) -> Any:
        index, item = pair
        try:
            return fn(item)
        except HyperdiffError as err:
            raise HyperdiffError(f"{self.names[index]}: {err}") from err


__all__ = ["MetaPlan"]
