"""What a built-in task is: data splits, the inner problem(s), and evaluation at given values.

A :class:`Task` holds

- ``problems``: the inner problems whose validation loss the hypergradient sees: one (hold-out
  validation) or one per cross-validation fold;
- ``selection``: a split that the hypergradient never sees, used only to pick the best
  hyperparameters and to stop early (``None`` when switched off);
- ``splits``: every split for reports (``train``, ``val``, ``selection``, ``test``); ``test`` is
  never used while tuning;
- ``final_problem``: the training run behind reports and black-box evaluations;
- ``summarize``: optional task-specific numbers about natural hyperparameter values.

Splits are drawn once from ``data_seed``: ``test`` first, then ``val``, then ``selection`` is
taken out of ``val`` (``selection_fraction`` of it); the rest is ``train``. With ``cv_folds = k``
the pool ``train + val`` is cut into k folds; fold j trains on the others and validates on j, and
the final model trains on the whole pool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import HyperdiffError
from ..hyperparams import HParamView, HyperParameters, per_feature
from ..optimizers import sgd
from ..problem import Problem, make_problem
from ..training import initial_state, unroll, validation_loss
from ..typing import Batch, Params

Metrics = Callable[[Params, HParamView, Batch], dict[str, float]]


@dataclass(frozen=True)
class SearchRange:
    """Natural-unit range of one hyperparameter for black-box search (a vector hyperparameter
    gets one shared value, broadcast to all its entries)."""

    low: float
    high: float
    log: bool = True


@dataclass(frozen=True)
class Splits:
    """Row indices of each split (``selection`` may be empty)."""

    train: Tensor
    val: Tensor
    selection: Tensor
    test: Tensor


@dataclass(frozen=True)
class Task:
    """A built-in tuning task (see the module doc)."""

    name: str
    description: str
    problems: tuple[Problem, ...]
    final_problem: Problem
    splits: dict[str, Batch]
    metrics: Metrics
    search_space: dict[str, SearchRange]
    info: dict[str, Any] = field(default_factory=dict)
    summarize: Callable[[Mapping[str, Tensor]], dict[str, float]] | None = None

    @property
    def hparams(self) -> HyperParameters:
        """The hyperparameters at their initial values."""
        return self.problems[0].hparams

    @property
    def selection(self) -> list[Batch] | None:
        """Selection batches (``None`` when the selection split is switched off)."""
        batch = self.splits.get("selection")
        return None if batch is None else [batch]

    def evaluate(
        self, raw: Mapping[str, Tensor] | None = None, *, seeds: tuple[int, ...] = (0,),
        segments: int = 1,
    ) -> dict[str, dict[str, float]]:
        """Train ``final_problem`` at ``raw`` from theta_0 (``segments`` times T steps, one run
        per seed) and average the metrics of every split over the seeds.

        Returns ``{split: {"loss": ..., "accuracy": ...}}``.
        """
        raw = self.hparams.raw if raw is None else dict(raw)
        total: dict[str, dict[str, float]] = {}
        for seed in seeds:
            params, _, hview = trained_params(self.final_problem, raw, seed=seed,
                                              segments=segments)
            with torch.no_grad():
                for split, batch in self.splits.items():
                    for key, value in self.metrics(params, hview, batch).items():
                        total.setdefault(split, {}).setdefault(key, 0.0)
                        total[split][key] += value / len(seeds)
        return total

    def outer_loss(self, values: Mapping[str, float | Tensor], seed: int = 0) -> float:
        """The loss hypergradients descend, at natural ``values``: the validation loss of each
        inner problem (one, or one per cross-validation fold) trained from theta_0, averaged.
        Costs ``len(self.problems)`` trainings; a diverged training gives a non-finite value.
        """
        raw = self.hparams.with_natural(**values).raw
        losses = []
        for problem in self.problems:
            params, buffers, hview = trained_params(problem, raw, seed=seed)
            with torch.no_grad():
                losses.append(float(validation_loss(problem, params, buffers, hview)))
        return sum(losses) / len(losses)

    def train_and_evaluate(
        self, values: Mapping[str, float | Tensor], seed: int = 0
    ) -> dict[str, float]:
        """Black-box interface: train at natural ``values`` (missing names keep their initial
        value; a number for a vector hyperparameter is broadcast) and return
        ``val_loss``, ``selection_loss`` (when there is a selection split), ``test_loss`` and
        ``test_accuracy`` (classification tasks)."""
        raw = self.hparams.with_natural(**values).raw
        report = self.evaluate(raw, seeds=(seed,))
        out = {f"{split}_{key}": value for split, m in report.items() for key, value in m.items()}
        return {k: v for k, v in out.items() if not k.startswith("train_")}


def trained_params(
    problem: Problem, raw: Mapping[str, Tensor], *, seed: int, segments: int = 1
) -> tuple[Params, Params, HParamView]:
    """theta and buffers after ``segments`` runs of T steps at ``raw`` (each run warm-starts
    the next), and the hyperparameter view they were trained with."""
    hview = problem.hparams.view(problem.raw_tensors(dict(raw)))
    params, buffers = problem.params, problem.buffers
    for segment in range(segments):
        run = replace(problem, params=params, buffers=buffers, seed=seed + 7919 * segment)
        with torch.no_grad():
            state, _ = unroll(run, hview, initial_state(run, differentiable=False),
                              differentiable=False)
        params, buffers = state.params, state.buffers
    return params, buffers, hview


def make_splits(
    n: int, *, test: float, val: float, selection_fraction: float, seed: int
) -> Splits:
    """Random split of ``n`` rows: ``test`` and ``val`` are fractions of ``n``; the selection
    split takes ``selection_fraction`` of the validation rows."""
    if not 0.0 <= selection_fraction < 1.0:
        raise HyperdiffError(
            f"task: selection_fraction must be in [0, 1) (got {selection_fraction})"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = int(round(test * n)), int(round(val * n))
    n_sel = int(round(selection_fraction * n_val))
    test_idx = perm[:n_test]
    val_all = perm[n_test : n_test + n_val]
    return Splits(
        train=perm[n_test + n_val :].sort().values,
        val=val_all[: n_val - n_sel].sort().values,
        selection=val_all[n_val - n_sel :].sort().values,
        test=test_idx.sort().values,
    )


def fold_indices(pool: Tensor, folds: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``folds`` (train, validation) index pairs that cut ``pool`` into near-equal parts."""
    if folds < 2 or folds > pool.numel():
        raise HyperdiffError(
            f"task: cv_folds must be 0 (off) or an int in [2, {pool.numel()}] (got {folds})"
        )
    perm = pool[torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed + 1))]
    parts = torch.tensor_split(perm, folds)
    pairs = []
    for j, held in enumerate(parts):
        rest = torch.cat([p for i, p in enumerate(parts) if i != j])
        pairs.append((rest.sort().values, held.sort().values))
    return pairs


def check_split_sizes(name: str, splits: Splits) -> None:
    """Refuse splits that leave train, validation or test without rows, with the sizes."""
    sizes = {k: int(v.numel()) for k, v in splits.__dict__.items()}
    empty = [k for k in ("train", "val", "test") if sizes[k] == 0]
    if empty:
        listed = ", ".join(f"{k} {n}" for k, n in sizes.items())
        hint = (" task.selection_fraction is the share of the validation rows held out for "
                "selection: lower it (0 switches the selection split off)"
                if "val" in empty and sizes["selection"] else "")
        raise HyperdiffError(
            f"task {name}: the {' and '.join(empty)} split must hold at least one row "
            f"(got {listed} rows).{hint}"
        )


def assemble(
    *,
    name: str,
    description: str,
    splits: Splits,
    problem_for: Callable[[Tensor, Tensor], Problem],
    batch_for: Callable[[Tensor], Batch],
    metrics: Metrics,
    search_space: dict[str, SearchRange],
    cv_folds: int,
    data_seed: int,
    info: dict[str, Any] | None = None,
    summarize: Callable[[Mapping[str, Tensor]], dict[str, float]] | None = None,
) -> Task:
    """Build a :class:`Task` from a problem factory ``problem_for(train_rows, val_rows)``."""
    check_split_sizes(name, splits)
    if cv_folds:
        pool = torch.cat([splits.train, splits.val]).sort().values
        problems = tuple(problem_for(tr, va) for tr, va in fold_indices(pool, cv_folds, data_seed))
        final = problem_for(pool, splits.val)
    else:
        problems = (problem_for(splits.train, splits.val),)
        final = problems[0]
    eval_splits = {"train": batch_for(splits.train), "val": batch_for(splits.val)}
    if splits.selection.numel():
        eval_splits["selection"] = batch_for(splits.selection)
    eval_splits["test"] = batch_for(splits.test)
    sizes = {k: int(v.numel()) for k, v in splits.__dict__.items()}
    return Task(
        name=name, description=description, problems=problems, final_problem=final,
        splits=eval_splits, metrics=metrics, search_space=search_space,
        info={"sizes": sizes, "cv_folds": cv_folds, **(info or {})}, summarize=summarize,
    )


def standardize(x: Tensor, rows: Tensor) -> Tensor:
    """Center and scale the columns of ``x`` with the statistics of ``rows`` only."""
    mean, std = x[rows].mean(0), x[rows].std(0)
    return (x - mean) / torch.where(std > 0, std, torch.ones_like(std))


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Mean cross-entropy and accuracy."""
    loss = torch.nn.functional.cross_entropy(logits, labels)
    return {"loss": float(loss), "accuracy": float((logits.argmax(-1) == labels).double().mean())}


def per_feature_l2_task(
    *,
    name: str,
    description: str,
    dataset: str,
    label_dtype: torch.dtype,
    theta0_of: Callable[[int], Params],
    losses: tuple[Callable[..., Tensor], Callable[..., Tensor]],
    metrics: Callable[..., dict[str, float]],
    initial_lam: float,
    search_space: Mapping[str, SearchRange],
    steps: int,
    selection_fraction: float,
    cv_folds: int,
    data_seed: int,
) -> Task:
    """A full-batch linear task on a bundled dataset with one L2 strength per standardized
    input feature, trained by heavy-ball SGD (lr 0.5, momentum 0.9) from ``theta0_of(d)``."""
    from .datasets import load  # local: datasets is a leaf the task modules also use

    x_np, y_np = load(dataset)
    x_all = torch.as_tensor(x_np, dtype=torch.float64)
    y = torch.as_tensor(y_np, dtype=label_dtype)
    splits = make_splits(
        len(y), test=0.25, val=0.25, selection_fraction=selection_fraction, seed=data_seed
    )
    x = standardize(x_all, splits.train)
    hparams = HyperParameters(lam=per_feature(initial_lam, x.shape[1]))
    theta0 = theta0_of(x.shape[1])
    train_loss, val_loss = losses

    def batch_for(rows: Tensor) -> Batch:
        return x[rows], y[rows]

    def problem_for(train_rows: Tensor, val_rows: Tensor) -> Problem:
        return make_problem(
            train_loss, val_loss, hparams, theta0, optimizer=sgd(0.5, 0.9),
            train_data=batch_for(train_rows), val_data=batch_for(val_rows), steps=steps,
            probe=False,
        )

    return assemble(
        name=name, description=description, splits=splits, problem_for=problem_for,
        batch_for=batch_for, metrics=metrics, search_space=dict(search_space),
        cv_folds=cv_folds, data_seed=data_seed,
    )
