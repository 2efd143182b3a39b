"""What a tuning task is once built: data splits, the inner problem(s), evaluation at given values.

A :class:`Task` (built from a :func:`hyperdiff.task` description by
:meth:`~hyperdiff.app.tasks.spec.TaskSpec.build`) holds

- ``problems``: the inner problems whose validation loss the hypergradient sees: one (hold-out
  validation) or one per cross-validation fold;
- ``selection``: a split that the hypergradient never sees, used only to pick the best
  hyperparameters and to stop early (``None`` when switched off);
- ``splits``: the batches of every split for reports (``train``, ``val``, ``selection``,
  ``test``); ``test`` is never used while tuning;
- ``final_problem``: the training run behind reports and black-box evaluations;
- ``metrics``: ``metrics(params, hparams, batch[, ctx]) -> {name: float}``; with a ``ctx`` it
  gets the trained buffers (BatchNorm running statistics) and ``ctx.train = False``, so a
  model evaluates in eval mode;
- ``summarize``: optional task-specific numbers about natural hyperparameter values.

Discrete hyperparameters (``categorical``, ``integer``, ``boolean``) need nothing special:
``evaluate`` and every black-box evaluation train the plain model, each discrete
hyperparameter fixed to one choice (:mod:`hyperdiff.hparams.choices`), and the default search
space has a :class:`SearchChoices` dimension (its labels) for each.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.app.tasks.metrics import split_metrics
from hyperdiff.engine.data.evaluation import EvaluationSplit
from hyperdiff.engine.models import StepContext
from hyperdiff.engine.problem import Problem, takes_context
from hyperdiff.engine.task_distribution import TaskDistribution
from hyperdiff.engine.training import initial_state, unroll, validation_loss
from hyperdiff.errors import HyperdiffError, fail, positive_int
from hyperdiff.hparams.choices import discretise, fixed_hparams
from hyperdiff.hparams.discrete import label
from hyperdiff.hparams.hyperparams import HParamView, HyperParameters
from hyperdiff.seeds import segment_seed
from hyperdiff.tuner.distributed.spread import LocalSpreader, Spreader
from hyperdiff.typing import Batch, Params

Metrics = Callable[..., dict[str, float]]
"""``metrics(params, hparams, batch)`` or ``metrics(params, hparams, batch, ctx)``."""


@dataclass(frozen=True)
class SearchRange:
    """Natural-unit range of one hyperparameter for black-box search (a vector hyperparameter
    gets one shared value, broadcast to all its entries)."""

    low: float
    high: float
    log: bool = True


@dataclass(frozen=True)
class SearchChoices(SearchRange):
    """A discrete dimension of a black-box search space: one of ``choices`` (JSON-ready
    labels), suggested by Optuna as a categorical and drawn uniformly by random search."""

    choices: tuple[Any, ...] = ()

    @classmethod
    def of(cls, choices: Sequence[Any]) -> SearchChoices:
        """The dimension over ``choices``, each kept as its label (a function: its name)."""
        labels = tuple(label(c) for c in choices)
        return cls(0.0, float(len(labels) - 1), False, labels)


@dataclass(frozen=True)
class Task:
    """A built tuning task (see the module doc)."""

    name: str
    description: str
    problems: tuple[Problem, ...]
    final_problem: Problem
    splits: dict[str, list[Batch] | EvaluationSplit]
    metrics: Metrics
    search_space: dict[str, SearchRange]
    info: dict[str, Any] = field(default_factory=dict)
    summarize: Callable[[Mapping[str, Tensor]], dict[str, float]] | None = None
    tasks: TaskDistribution | None = None  # meta-learning: the distribution of tasks

    @property
    def hparams(self) -> HyperParameters:
        """The hyperparameters at their initial values."""
        return self.problems[0].hparams

    @property
    def selection(self) -> list[Batch] | None:
        """Selection batches (``None`` when the selection split is switched off)."""
        batches = self.splits.get("selection")
        return None if batches is None else list(batches)

    def evaluate(
        self, raw: Mapping[str, Tensor] | None = None, *, seeds: tuple[int, ...] = (0,),
        segments: int = 1, progress: Callable[[], None] | None = None,
        spread: Spreader | None = None,
    ) -> dict[str, dict[str, float]]:
        """Train ``final_problem`` at ``raw`` from theta_0 (``segments`` times T steps, one run
        per seed) and average the metrics of every split over the seeds (and over the split's
        batches, when it has several). The metrics see the trained buffers in eval mode.
        Discrete hyperparameters are fixed to their argmax choice at ``raw`` (the plain model,
        :func:`~hyperdiff.hparams.choices.discretise`).

        ``progress()`` is called after each training; ``spread`` maps the trainings (over the
        ranks of a process group, see :meth:`evaluate_all`). Returns
        ``{split: {"loss": ..., "accuracy": ...}}``.
        """
        return self.evaluate_all([raw], seeds=seeds, segments=segments, progress=progress,
                                 spread=spread)[0]

    def evaluate_all(
        self, raws: Sequence[Mapping[str, Tensor] | None], *, seeds: tuple[int, ...] = (0,),
        segments: int = 1, progress: Callable[[], None] | None = None,
        spread: Spreader | None = None,
    ) -> list[dict[str, dict[str, float]]]:
        """:meth:`evaluate` at each of ``raws`` (``None``: the initial values), their
        ``len(raws) x len(seeds)`` trainings mapped by ``spread`` in one go."""
        requests = []
        for raw in raws:
            values = self.hparams.raw if raw is None else dict(raw)
            requests.append((discretise(self.final_problem.hparams, values), values))
        return self.evaluate_as_all(requests, seeds=seeds, segments=segments,
                                    progress=progress, spread=spread)

    def evaluate_as(
        self, hparams: HyperParameters, raw: Mapping[str, Tensor], *,
        seeds: tuple[int, ...] = (0,), segments: int = 1,
        progress: Callable[[], None] | None = None, spread: Spreader | None = None,
    ) -> dict[str, dict[str, float]]:
        """:meth:`evaluate` with the final training's hyperparameter specs ``hparams`` taken as
        they are (e.g. a relaxed mixture of the discrete options; no argmax)."""
        return self.evaluate_as_all([(hparams, raw)], seeds=seeds, segments=segments,
                                    progress=progress, spread=spread)[0]

    def evaluate_as_all(
        self, requests: Sequence[tuple[HyperParameters, Mapping[str, Tensor]]], *,
        seeds: tuple[int, ...] = (0,), segments: int = 1,
        progress: Callable[[], None] | None = None, spread: Spreader | None = None,
        splits: Collection[str] | None = None,
    ) -> list[dict[str, dict[str, float]]]:
        """:meth:`evaluate_as` of each ``(hparams, raw)`` request (the metrics of ``splits``
        only, if given: :meth:`metrics_at`). Its ``len(requests) x
        len(seeds)`` trainings are independent: ``spread`` maps them (``None``: here, in
        order; a :class:`~hyperdiff.tuner.distributed.spread.RankSpreader` runs training ``i``
        on rank ``i % W`` and gathers the metrics on every rank), and each request's metrics
        are averaged over its seeds in seed order, so every rank holds the one-process result
        bit for bit. ``progress()`` after each training (the other ranks' once gathered)."""
        caller = f"task {self.name}"
        seeds = checked_seeds(caller, seeds)
        positive_int(caller, "segments", segments)
        if splits is not None:
            self._check_splits(caller, splits)
        jobs = []
        for hparams, raw in requests:
            problem = self.final_problem
            if hparams is not problem.hparams:
                problem = replace(problem, hparams=hparams)
            jobs += [(problem, raw, seed) for seed in seeds]

        def train(job: tuple[Problem, Mapping[str, Tensor], int]) -> dict[str, dict[str, float]]:
            problem, raw, seed = job
            params, buffers, hview = trained_params(problem, raw, seed=seed, segments=segments)
            return self.metrics_at(params, buffers, hview, seed=seed, splits=splits)

        done = (spread or LocalSpreader()).map(train, jobs, "report trainings", progress)
        n = len(seeds)
        return [mean_over_seeds(done[i * n:(i + 1) * n]) for i in range(len(requests))]

    def evaluate_values(self, values: Mapping[str, Any], seeds: Sequence[int],
                        spread: Spreader | None = None,
                        progress: Callable[[], None] | None = None,
                        ) -> dict[str, dict[str, float]]:
        """:meth:`evaluate` at natural ``values`` (lists for per-coordinate vectors; plain
        choices or their labels for discrete hyperparameters) on ``seeds``."""
        return self.evaluate(fixed_hparams(self.hparams, values).raw, seeds=tuple(seeds),
                             spread=spread, progress=progress)

    def metrics_at(self, params: Params, buffers: Params, hview: HParamView, *, seed: int = 0,
                   splits: Collection[str] | None = None) -> dict[str, dict[str, float]]:
        """The metrics of every split (of ``splits`` only, if given) at trained ``params`` /
        ``buffers`` (eval mode), averaged over each split's samples
        (:func:`~hyperdiff.app.tasks.metrics.split_metrics`): ``{split: {"loss": ..., ...}}``."""
        if splits is not None:
            self._check_splits(f"task {self.name}", splits)
        with_ctx = takes_context(self.metrics, "metrics")
        with torch.no_grad():
            return {split: split_metrics(self.metrics, with_ctx, params, hview, batches,
                                         StepContext(step=-1, seed=seed, train=False,
                                                     buffers=buffers), split=split,
                                         caller=f"task {self.name}")
                    for split, batches in self.splits.items()
                    if splits is None or split in splits}

    def outer_loss(self, values: Mapping[str, Any], seed: int = 0) -> float:
        """The loss hypergradients descend, at natural ``values``: the validation loss of each
        inner problem (one, or one per cross-validation fold) trained from theta_0, averaged.
        Discrete hyperparameters take plain choices (or labels) in ``values``.
        Costs ``len(self.problems)`` trainings; a diverged training gives a non-finite value.
        """
        raw = fixed_hparams(self.hparams, values).raw
        losses = []
        for problem in self.problems:
            hparams = discretise(problem.hparams, raw)
            if hparams is not problem.hparams:
                problem = replace(problem, hparams=hparams)
            params, buffers, hview = trained_params(problem, raw, seed=seed)
            with torch.no_grad():
                losses.append(float(validation_loss(problem, params, buffers, hview)))
        return sum(losses) / len(losses)

    def train_and_evaluate(
        self, values: Mapping[str, Any], seed: int = 0,
        splits: Collection[str] = ("val", "selection", "test"),
    ) -> dict[str, float]:
        """Black-box interface: train at natural ``values`` (missing names keep their initial
        value; a number for a vector hyperparameter is broadcast; a discrete hyperparameter
        takes a plain choice or its label) and return ``val_loss``, ``selection_loss`` (when
        there is a selection split), ``test_loss`` and ``test_accuracy`` (classification
        tasks): the metrics of ``splits`` only (a search trial needs no test pass; the train
        split's are never computed)."""
        self._check_splits(f"task {self.name}", splits, maybe=("train", "selection"))
        raw = fixed_hparams(self.hparams, values).raw
        [report] = self.evaluate_as_all([(discretise(self.final_problem.hparams, raw), raw)],
                                        seeds=(seed,),
                                        splits=[s for s in splits if s in self.splits
                                                and s != "train"])
        return {f"{split}_{key}": value for split, m in report.items() for key, value in m.items()}

    def _check_splits(self, caller: str, splits: Any, maybe: Collection[str] = ()) -> None:
        """Refuse ``splits`` unless it is a collection of names of this task's splits (or of
        ``maybe``: ones it may lack, e.g. a selection split switched off)."""
        known = list(self.splits) + [name for name in maybe if name not in self.splits]
        if isinstance(splits, (str, bytes)) or not isinstance(splits, Collection):
            raise fail(caller, "splits", f"a list of split names among {known}", splits)
        for name in splits:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise HyperdiffError(f"{caller}: splits must be names of the task's splits, "
                                     f"among {known} (got {name!r}){hint}")


def checked_seeds(caller: str, seeds: Any) -> tuple[int, ...]:
    """``seeds`` as a tuple if it is a non-empty sequence of ints (not bools), else raise."""
    if (isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise fail(caller, "seeds", "a non-empty tuple of int seeds, e.g. (0, 1, 2)", seeds)
    return tuple(seeds)


def mean_over_seeds(per_seed: Sequence[Mapping[str, Mapping[str, float]]]
                    ) -> dict[str, dict[str, float]]:
    """``{split: {key: sum_s value_s / S}}`` over the ``S`` seeds' metrics, summed in order."""
    total: dict[str, dict[str, float]] = {}
    for metrics in per_seed:
        for split, values in metrics.items():
            for key, value in values.items():
                total.setdefault(split, {}).setdefault(key, 0.0)
                total[split][key] += value / len(per_seed)
    return total


def trained_params(
    problem: Problem, raw: Mapping[str, Tensor], *, seed: int, segments: int = 1
) -> tuple[Params, Params, HParamView]:
    """theta and buffers after ``segments`` runs of T steps at ``raw`` (each run warm-starts
    the next), and the hyperparameter view they were trained with."""
    hview = problem.hparams.view(problem.raw_tensors(dict(raw)))
    params, buffers = problem.params, problem.buffers
    for segment in range(segments):
        run = replace(problem, params=params, buffers=buffers, seed=segment_seed(seed, segment))
        with torch.no_grad():
            state, _ = unroll(run, hview, initial_state(run, hview, differentiable=False),
                              differentiable=False)
        params, buffers = state.params, state.buffers
    return params, buffers, hview


def standardize(x: Tensor, rows: Tensor) -> Tensor:
    """Center and scale the columns of ``x`` with the statistics of ``rows`` only."""
    mean, std = x[rows].mean(0), x[rows].std(0)
    return (x - mean) / torch.where(std > 0, std, torch.ones_like(std))


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Mean cross-entropy and accuracy."""
    loss = torch.nn.functional.cross_entropy(logits, labels)
    return {"loss": float(loss), "accuracy": float((logits.argmax(-1) == labels).double().mean())}
