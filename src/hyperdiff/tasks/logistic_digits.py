"""Multinomial logistic regression with one L2 strength per feature on scikit-learn's digits.

Features ``x`` (64 pixels, standardized with training statistics), labels ``y`` in 0..9.
Inner problem: ``min_{W,b} mean(CE(x W + b, y)) + sum_j lam_j sum_k W_jk^2`` with ``W`` of
shape (64, 10) and ``b`` of shape (10,) (650 parameters), by full-batch heavy-ball SGD for T
steps from zero; outer loss: validation cross-entropy. 64 hyperparameters ``lam`` (one per
input feature): the many-hyperparameter case that black-box search cannot follow.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import cross_entropy

from ..hyperparams import HParamView, HyperParameters, per_feature
from ..optimizers import sgd
from ..problem import Problem, make_problem
from ..typing import Batch, Params
from .base import SearchRange, Task, assemble, classification_metrics, make_splits, standardize
from .datasets import load

SUMMARY = "multinomial logistic regression on digits (650 parameters)"
TUNES = "lam per feature (64)"
DEFAULT_STEPS = 100
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "outer.lr": 0.5, "stop.max_steps": 30}
INITIAL = {"lam": 1e-2}
CLASSES = 10


def logits(params: Params, x: Tensor) -> Tensor:
    """``x W + b``: (n, 64) -> (n, 10)."""
    return x @ params["W"] + params["b"]


def train_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    """``mean(CE(x W + b, y)) + sum_j lam_j sum_k W_jk^2``."""
    x, y = batch
    penalty = (hparams["lam"] * params["W"].square().sum(1)).sum()
    return cross_entropy(logits(params, x), y) + penalty


def val_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    """Validation cross-entropy."""
    x, y = batch
    return cross_entropy(logits(params, x), y)


def metrics(params: Params, hparams: HParamView, batch: Batch) -> dict[str, float]:
    x, y = batch
    return classification_metrics(logits(params, x), y)


def build(
    *, steps: int | None = None, selection_fraction: float = 0.5, cv_folds: int = 0,
    data_seed: int = 0,
) -> Task:
    """The per-feature L2 multinomial logistic regression task (see the module doc)."""
    steps = steps or DEFAULT_STEPS
    x_np, y_np = load("digits")
    x_all = torch.as_tensor(x_np, dtype=torch.float64)
    y = torch.as_tensor(y_np, dtype=torch.long)
    splits = make_splits(
        len(y), test=0.25, val=0.25, selection_fraction=selection_fraction, seed=data_seed
    )
    x = standardize(x_all, splits.train)
    features = x.shape[1]
    hparams = HyperParameters(lam=per_feature(INITIAL["lam"], features))
    theta0 = {"W": torch.zeros(features, CLASSES, dtype=torch.float64),
              "b": torch.zeros(CLASSES, dtype=torch.float64)}

    def batch_for(rows: Tensor) -> Batch:
        return x[rows], y[rows]

    def problem_for(train_rows: Tensor, val_rows: Tensor) -> Problem:
        return make_problem(
            train_loss, val_loss, hparams, theta0, optimizer=sgd(0.5, 0.9),
            train_data=batch_for(train_rows), val_data=batch_for(val_rows), steps=steps,
            probe=False,
        )

    return assemble(
        name="logistic_digits", description=SUMMARY, splits=splits, problem_for=problem_for,
        batch_for=batch_for, metrics=metrics, search_space={"lam": SearchRange(1e-5, 1.0)},
        cv_folds=cv_folds, data_seed=data_seed,
    )
