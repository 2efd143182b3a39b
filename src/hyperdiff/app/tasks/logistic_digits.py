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

from hyperdiff.app.tasks.base import SearchRange, classification_metrics
from hyperdiff.app.tasks.per_feature import per_feature_l2_task
from hyperdiff.app.tasks.spec import TaskSpec
from hyperdiff.hparams.hyperparams import HParamView
from hyperdiff.typing import Batch, Params

SUMMARY = "multinomial logistic regression on digits (650 parameters)"
TUNES = "lam per feature (64)"
DEFAULT_STEPS = 100
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "stop.max_steps": 20, "task.cv_folds": 5,
            "outer.tie_steps": 8}
"""64 penalties fit a 225-example validation split easily (docs/blackbox.md): the defaults
tune the shared level first (8 tied steps, picked by the 5-fold CV loss), then let the
penalties spread only while the selection split agrees."""
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


def initial_params(features: int) -> Params:
    """Zeros: theta_0 of the inner training."""
    return {"W": torch.zeros(features, CLASSES, dtype=torch.float64, device="cpu"),
            "b": torch.zeros(CLASSES, dtype=torch.float64, device="cpu")}


def build(*, steps: int = DEFAULT_STEPS) -> TaskSpec:
    """The per-feature L2 multinomial logistic regression task (see the module doc)."""
    return per_feature_l2_task(
        name="logistic_digits", description=SUMMARY, dataset="digits", label_dtype=torch.long,
        theta0_of=initial_params, losses=(train_loss, val_loss), metrics=metrics,
        initial_lam=INITIAL["lam"], search_space={"lam": SearchRange(1e-5, 1.0)}, steps=steps,
        defaults=DEFAULTS,
    )
