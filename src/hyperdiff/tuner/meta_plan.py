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
over the ranks of a process group as the offline plan's trainings are. Stopping and the
checkpoint are the offline plan's; the result is the final values (each step's losses are of
other tasks, so the step with the lowest one is the luckiest draw).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from torch import Tensor

from hyperdiff.engine.task_distribution import TaskDistribution, task_distribution
from hyperdiff.errors import HyperdiffError, Text, fail, positive_int
from hyperdiff.hparams.discrete import discrete_names
from hyperdiff.seeds import meta_task
from hyperdiff.tuner.distributed.spread import spreader_for
from hyperdiff.tuner.driver_checks import check_selection
from hyperdiff.tuner.history import OptimizeResult
from hyperdiff.tuner.offline_plan import OfflinePlan, offline_method, sampled_outcome
from hyperdiff.tuner.plan import Outcome, bind_once
from hyperdiff.tuner.sampler import Sampler


class MetaPlan(OfflinePlan):
    """Every outer step trains on ``batch`` new tasks and averages their hypergradients.

    Args:
        tasks: the task distribution, ``hd.tasks.distribution(sample)`` or the function
            ``sample(index, seed) -> (support, query)`` itself
            (:mod:`hyperdiff.engine.task_distribution`).
        batch: tasks per outer step (the meta-batch ``m``).

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

    def __init__(self, tasks: TaskDistribution | Any, batch: int = 1):
        self.tasks = tasks if isinstance(tasks, TaskDistribution) else task_distribution(tasks)
        self.batch = positive_int("MetaPlan", "batch", batch)
        super().__init__(samples=self.batch)

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
        if loop.selection is not None:  # none is usual: each step's tasks are new
            check_selection(loop.problems[0], loop.selection)
        self.problems = loop.problems
        self.spreader = spreader_for(method, loop.process_group)
        # the run's counters and (empty) warm slots, in the offline plan's checkpoint layout
        self._sampler = Sampler(loop.problems, method, samples=self.batch, auto=None,
                                seed=loop.seed, selection=loop.selection, warm_start=False,
                                discrete=None, spreader=self.spreader)

    def task_indices(self, loop: Any, step: int) -> list[tuple[int, int]]:
        """``(index, seed)`` of each task of outer ``step`` (:func:`~hyperdiff.seeds.meta_task`)."""
        return [meta_task(loop.seed, step, self.batch, i) for i in range(self.batch)]

    def evaluate(self, loop: Any, step: int, raw: dict[str, Tensor]) -> Outcome:
        """Adapt on each task of the step's batch at ``raw``; the mean hypergradient."""
        base = self.problems[0]
        try:
            problems = tuple(self.tasks.problem(base, index, seed)
                             for index, seed in self.task_indices(loop, step))
        except HyperdiffError as err:
            raise HyperdiffError(f"MetaPlan: outer step {step}: {err}") from err
        tasks = Sampler(problems, self.sampler.method, samples=1, auto=None, seed=loop.seed,
                        selection=loop.selection, warm_start=False, discrete=None,
                        spreader=self.spreader, batched=True)
        outcome = sampled_outcome(loop, tasks, step, raw)
        return outcome._replace(fields={**outcome.fields, "samples": self.batch})

    def result(self, loop: Any) -> OptimizeResult:
        """The final values (``criterion="final values"``): each step's losses are of other
        tasks, so the step with the lowest batch loss is the luckiest draw, not the best
        theta_0; ``best_step`` is the last step, ``best_loss`` its batch loss."""
        ranked = super().result(loop)
        last = loop.history[-1]
        return replace(ranked, best_raw=ranked.final_raw,
                       best_hparams=loop.hparams.with_raw(ranked.final_raw),
                       best_step=int(last.step), best_loss=float(last.val_loss or math.nan),
                       criterion="final values")

    def where(self, loop: Any) -> str:
        return f"meta step {loop.step_index}"


__all__ = ["MetaPlan"]
