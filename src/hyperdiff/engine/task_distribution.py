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
validation data (a batch or a list of batches). An optional second function ``held_out`` of
the same form draws the held-out tasks of a meta run's report (for example episodes of
meta-test classes that meta-training never sees); without one the report draws from
``sample`` with seeds that meta-training never uses.

>>> import torch
>>> tasks = task_distribution(lambda i, seed: ((torch.ones(2, 1) * i,), (torch.zeros(3, 1),)))
>>> support, query = tasks.sample(4, 0)
>>> float(support[0][0, 0]), query[0].shape
(4.0, torch.Size([3, 1]))
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.data.convert import as_source, validation_batches
from hyperdiff.engine.data.permutation import mix
from hyperdiff.engine.data.random_state import untracked_draws, untracked_states
from hyperdiff.engine.data.replay import fingerprint
from hyperdiff.engine.datacheck import check_batch, check_source
from hyperdiff.engine.device import OnDevice, to_device
from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import TrainState, initial_state, unroll, validation_loss
from hyperdiff.errors import HyperdiffError, describe, fail, user_failure
from hyperdiff.hparams.hyperparams import HParamView
from hyperdiff.tree import leaves

TaskSampler = Callable[[int, int], tuple[Any, Any]]
"""``sample(index, seed) -> (support, query)``."""


DRAWN_KEPT = 4096
"""How many first draws :class:`TaskDistribution` keeps the fingerprints of (a meta run's
steps draw new tasks without bound; a redraw comes soon after its draw: the step retried, the
validation tasks, or the report's pretraining, which compares the draws still kept)."""


@dataclass(frozen=True)
class TaskDistribution:
    """A task distribution (module doc): ``sample(index, seed) -> (support, query)``."""

    sample: TaskSampler
    name: str = "tasks"
    held_out: TaskSampler | None = None
    # the fingerprint of each task's first draw in this process, by (held out, index, seed),
    # the last DRAWN_KEPT draws only (a long run draws without bound): a redraw (a retried
    # step, the report's pre-training baseline) must give the same task
    drawn: OrderedDict[tuple[bool, int, int], bytes] = field(
        default_factory=OrderedDict, init=False, repr=False, compare=False)

    def problem(self, base: Problem, index: int, seed: int, *, held_out: bool = False
                ) -> Problem:
        """``base`` with task ``index``'s support set as its training data and its query set
        as its validation data (``held_out``: the held-out sampler's task, when there is
        one), on ``base``'s device (and in its dtype) when ``base`` was moved
        there (``problem.to(device, dtype)``, ``--device``).

        Raises:
            HyperdiffError: ``sample`` did not return a pair ``(support, query)``, or either
                is not data.
        """
        sample = self.held_out if held_out and self.held_out is not None else self.sample
        pair = self._drawn(sample, index, seed)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise HyperdiffError(
                f"{self.name}: sample({index}, {seed}) must return a pair (support, query) "
                f"(got {type(pair).__name__} {describe(pair)})")
        support, query = pair
        where = f"{self.name}: task {index}'s"
        try:
            train = as_source(support, "support")
            val = validation_batches(query)
            train.check(base.steps, base.seed)
        except HyperdiffError as err:
            raise HyperdiffError(f"{where} data: {err}") from err
        task = f"{self.name}: task {index}"  # what make_problem checks of its data
        check_source(task, "support set", train, base.seed)
        for batch in val:
            check_batch(task, "query set", batch)
        problem = replace(base, train_data=train, val_data=val)
        if isinstance(base.train_data, OnDevice):  # a template moved by .to(device, dtype)
            problem = to_device(problem, base.train_data.device, base.train_data.dtype)
        task = f"{self.name}: task {index} (seed {seed})"
        _check_like(task, "support set", problem.train_data.batch(0, base.seed),
                    base.train_data.batch(0, base.seed), "training")
        for batch in problem.val_data:
            _check_like(task, "query set", batch, base.val_data[0], "validation")
        return problem

    def _drawn(self, sample: TaskSampler, index: int, seed: int) -> Any:
        """``sample(index, seed)`` with torch's global generator seeded from ``(seed, index)``
        (and the user's state put back), so that a sampler drawing from it draws the same task
        every time; its own errors, and draws from Python's or NumPy's global generator (which
        would not replay), named."""
        before = untracked_states()

        def failed(err: BaseException) -> str:
            return (f"{self.name}: sample({index}, {seed}) must return a task (got "
                    f"{type(err).__name__}: {err})")

        with user_failure(failed), torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix(seed, index))
            pair = sample(index, seed)
        moved = untracked_draws(before)
        if moved:
            raise HyperdiffError(
                f"{self.name}: sample({index}, {seed}) must draw its randomness from the seed "
                f"it is given or from torch (got draws from {' and '.join(moved)}, which a "
                "replay or a resume would not repeat)")
        key, printed = (sample is not self.sample, index, seed), _fingerprint(pair)
        first = self.drawn.setdefault(key, printed) if printed is not None else None
        if len(self.drawn) > DRAWN_KEPT:  # the oldest first draw: ~300 bytes a task
            self.drawn.popitem(last=False)
        if first != printed:
            raise HyperdiffError(
                f"{self.name}: sample({index}, {seed}) must give the same task every time it is "
                "called with the same arguments (got other data than its first call gave: a "
                "retried step or a resumed run would train on another task); draw from "
                "torch.Generator().manual_seed(seed), not from a state the calls change")
        return pair


def _fingerprint(pair: Any) -> bytes | None:
    """The digest of a drawn task's data (:func:`~hyperdiff.engine.data.replay.fingerprint`),
    or ``None`` for data it cannot read (a sparse tensor)."""
    try:
        return fingerprint(pair)
    except (RuntimeError, TypeError):
        return None


def _check_like(task: str, name: str, batch: Any, template: Any, split: str) -> None:
    """Refuse a task's batch whose structure, tensor dimensions or dtypes are not those of the
    template's ``split`` batch (a target of shape ``(n,)`` against ``(n, 1)`` would broadcast
    in the loss without an error); sizes may differ (shots, sequence lengths)."""
    mine = {path: leaf for path, leaf in leaves(batch, name)}
    like = {path.replace("batch", name, 1): leaf for path, leaf in leaves(template, "batch")}
    if list(mine) != list(like):
        raise HyperdiffError(f"{task}: {name} must have the entries of the template's {split} "
                             f"batch, {list(like)} (got {list(mine)})")
    for path, leaf in mine.items():
        other = like[path]
        if isinstance(other, Tensor) and not (
                isinstance(leaf, Tensor) and leaf.dim() == other.dim()
                and leaf.dtype == other.dtype):
            got = (f"shape {tuple(leaf.shape)} {str(leaf.dtype).removeprefix('torch.')}"
                   if isinstance(leaf, Tensor) else describe(leaf))
            broadcast = isinstance(leaf, Tensor) and leaf.dim() != other.dim()
            raise HyperdiffError(
                f"{task}: {path} must be a {other.dim()}-d "
                f"{str(other.dtype).removeprefix('torch.')} tensor, as in the template's "
                f"{split} batch (shape {tuple(other.shape)}) (got {got})"
                + ("; a loss would broadcast it silently" if broadcast else ""))


def task_distribution(sample: TaskSampler, *, name: str = "tasks",
                      held_out: TaskSampler | None = None) -> TaskDistribution:
    """The task distribution ``sample(index, seed) -> (support, query)`` (module doc), with
    ``held_out(index, seed)`` drawing the report's held-out tasks if given.

    Raises:
        HyperdiffError: ``sample`` or a given ``held_out`` is not callable, or ``name`` is not
            a non-empty string.
    """
    if not callable(sample):
        raise fail("task_distribution", "sample",
                   "a function sample(index, seed) -> (support, query)", sample)
    if held_out is not None and not callable(held_out):
        raise fail("task_distribution", "held_out",
                   "None or a function held_out(index, seed) -> (support, query)", held_out)
    if not isinstance(name, str) or not name:
        raise fail("task_distribution", "name", "a non-empty string", name)
    return TaskDistribution(sample, name, held_out)


def adapted(problem: Problem, raw: Mapping[str, Tensor]) -> tuple[TrainState, HParamView]:
    """theta_T of ``problem`` (one task) trained on its support set at the raw values
    ``raw``, without a graph, and the hyperparameters' view at ``raw``."""
    with torch.no_grad():
        hview = problem.hparams.view(problem.raw_tensors(dict(raw)))
        state = initial_state(problem, hview, differentiable=False)
        state, _ = unroll(problem, hview, state, differentiable=False)
    return state, hview


def adapted_query_loss(problem: Problem, raw: Mapping[str, Tensor]) -> float:
    """``L_val(theta_T)``: the query loss of ``problem`` (one task) after :func:`adapted`."""
    state, hview = adapted(problem, raw)
    with torch.no_grad():
        return float(validation_loss(problem, state.params, state.buffers, hview))


__all__ = ["TaskDistribution", "TaskSampler", "adapted", "adapted_query_loss",
           "task_distribution"]
