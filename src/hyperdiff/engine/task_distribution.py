"""A distribution of tasks: task ``i`` is a support set (training) and a query set (validation).

Meta-learning is hyperparameter optimization over many tasks: each task adapts the model on
its *support* set (the problem's training split) and scores it on its *query* set (the
validation split). A user describes the distribution with one function::

    sample(index, seed) -> (support, query)

``index`` numbers the task (``0, 1, ...``: a meta run's outer step ``s`` draws tasks
``s * m .. s * m + m - 1``, :func:`~hyperdiff.seeds.meta_task`) and ``seed`` is its own seed, so
the function can draw with ``torch.Generator().manual_seed(seed)``; it must give the same task
for the same arguments (a resumed run draws the same tasks). ``support`` is any training data
``hd.make_problem`` takes (a batch, a list of batches, ``fn(step, seed)``), ``query`` any
validation data (a batch or a list of batches).

>>> import torch
>>> tasks = task_distribution(lambda i, seed: ((torch.ones(2, 1) * i,), (torch.zeros(3, 1),)))
>>> support, query = tasks.sample(4, 0)
>>> float(support[0][0, 0]), query[0].shape
(4.0, torch.Size([3, 1]))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hyperdiff.engine.data.convert import as_source, validation_batches
from hyperdiff.engine.device import OnDevice, to_device
from hyperdiff.engine.problem import Problem
from hyperdiff.errors import HyperdiffError, describe, fail

TaskSampler = Callable[[int, int], tuple[Any, Any]]
"""``sample(index, seed) -> (support, query)``."""


@dataclass(frozen=True)
class TaskDistribution:
    """A task distribution (module doc): ``sample(index, seed) -> (support, query)``."""

    sample: TaskSampler
    name: str = "tasks"

    def problem(self, base: Problem, index: int, seed: int) -> Problem:
        """``base`` with task ``index``'s support set as its training data and its query set
        as its validation data, on ``base``'s device (and in its dtype) when ``base`` was moved
        there (``problem.to(device, dtype)``, ``--device``).

        Raises:
            HyperdiffError: ``sample`` did not return a pair ``(support, query)``, or either
                is not data.
        """
        pair = self.sample(index, seed)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise HyperdiffError(
                f"{self.name}: sample({index}, {seed}) must return a pair (support, query) "
                f"(got {type(pair).__name__} {describe(pair)})")
        support, query = pair
        where = f"{self.name}: task {index}'s"
        try:
            train = as_source(support, "support")
            val = validation_batches(query)
        except HyperdiffError as err:
            raise HyperdiffError(f"{where} data: {err}") from err
        problem = replace(base, train_data=train, val_data=val)
        if isinstance(base.train_data, OnDevice):  # a template moved by .to(device, dtype)
            return to_device(problem, base.train_data.device, base.train_data.dtype)
        return problem


def task_distribution(sample: TaskSampler, *, name: str = "tasks") -> TaskDistribution:
    """The task distribution ``sample(index, seed) -> (support, query)`` (module doc).

    Raises:
        HyperdiffError: ``sample`` is not callable, or ``name`` is not a non-empty string.
    """
    if not callable(sample):
        raise fail("task_distribution", "sample",
                   "a function sample(index, seed) -> (support, query)", sample)
    if not isinstance(name, str) or not name:
        raise fail("task_distribution", "name", "a non-empty string", name)
    return TaskDistribution(sample, name)


__all__ = ["TaskDistribution", "TaskSampler", "task_distribution"]
