"""Logistic regression with one L2 strength per feature on scikit-learn's breast_cancer data.

Features ``x`` (30 standardized columns), labels ``y`` in {0, 1}. Inner problem:
``min_{w,b} mean(BCE(x w + b, y)) + sum_j lam_j w_j^2`` by full-batch heavy-ball SGD for T steps
from zero; outer loss: validation cross-entropy. 30 hyperparameters ``lam`` (one per feature).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import binary_cross_entropy_with_logits

from ..hyperparams import HParamView, HyperParameters, per_feature
from ..optimizers import sgd
from ..problem import Problem, make_problem
from ..typing import Batch, Params
from .base import SearchRange, Task, assemble, make_splits, standardize
from .datasets import load

SUMMARY = "logistic regression on breast_cancer"
TUNES = "lam per feature (30)"
DEFAULT_STEPS = 100
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "outer.lr": 0.2, "stop.max_steps": 40}
INITIAL = {"lam": 0.05}


def logits(params: Params, x: Tensor) -> Tensor:
    return x @ params["w"] + params["b"]


def train_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    """``mean(BCE(x w + b, y)) + sum_j lam_j w_j^2``."""
    x, y = batch
    penalty = (hparams["lam"] * params["w"] ** 2).sum()
    return binary_cross_entropy_with_logits(logits(params, x), y) + penalty


def val_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    """Validation cross-entropy."""
    x, y = batch
    return binary_cross_entropy_with_logits(logits(params, x), y)


def metrics(params: Params, hparams: HParamView, batch: Batch) -> dict[str, float]:
    x, y = batch
    z = logits(params, x)
    return {
        "loss": float(binary_cross_entropy_with_logits(z, y)),
        "accuracy": float(((z > 0).double() == y).double().mean()),
    }


def build(
    *, steps: int | None = None, selection_fraction: float = 0.5, cv_folds: int = 0,
    data_seed: int = 0,
) -> Task:
    """The per-feature L2 logistic regression task (see the module doc)."""
    steps = steps or DEFAULT_STEPS
    x_np, y_np = load("breast_cancer")
    x_all = torch.as_tensor(x_np, dtype=torch.float64)
    y = torch.as_tensor(y_np, dtype=torch.float64)
    splits = make_splits(
        len(y), test=0.25, val=0.25, selection_fraction=selection_fraction, seed=data_seed
    )
    x = standardize(x_all, splits.train)
    hparams = HyperParameters(lam=per_feature(INITIAL["lam"], x.shape[1]))
    theta0 = {"w": torch.zeros(x.shape[1], dtype=torch.float64),
              "b": torch.zeros((), dtype=torch.float64)}

    def batch_for(rows: Tensor) -> Batch:
        return x[rows], y[rows]

    def problem_for(train_rows: Tensor, val_rows: Tensor) -> Problem:
        return make_problem(
            train_loss, val_loss, hparams, theta0, optimizer=sgd(0.5, 0.9),
            train_data=batch_for(train_rows), val_data=batch_for(val_rows), steps=steps,
            probe=False,
        )

    return assemble(
        name="logistic_cancer", description=SUMMARY, splits=splits, problem_for=problem_for,
        batch_for=batch_for, metrics=metrics, search_space={"lam": SearchRange(1e-4, 10.0)},
        cv_folds=cv_folds, data_seed=data_seed,
    )
