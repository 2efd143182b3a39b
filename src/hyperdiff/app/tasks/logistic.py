"""Logistic regression with one L2 strength per feature on scikit-learn's breast_cancer data.

Features ``x`` (30 standardized columns), labels ``y`` in {0, 1}. Inner problem:
``min_{w,b} mean(BCE(x w + b, y)) + sum_j lam_j w_j^2`` by full-batch heavy-ball SGD for T steps
from zero; outer loss: validation cross-entropy. 30 hyperparameters ``lam`` (one per feature).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import binary_cross_entropy_with_logits

from hyperdiff.app.tasks.base import SearchRange
from hyperdiff.app.tasks.per_feature import per_feature_l2_task
from hyperdiff.app.tasks.spec import TaskSpec
from hyperdiff.hparams.hyperparams import HParamView
from hyperdiff.typing import Batch, Params

SUMMARY = "logistic regression on breast_cancer"
TUNES = "lam per feature (30)"
DEFAULT_STEPS = 100
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "stop.max_steps": 40}
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


def initial_params(features: int) -> Params:
    """Zeros: theta_0 of the inner training."""
    return {"w": torch.zeros(features, dtype=torch.float64, device="cpu"),
            "b": torch.zeros((), dtype=torch.float64, device="cpu")}


def build(*, steps: int = DEFAULT_STEPS) -> TaskSpec:
    """The per-feature L2 logistic regression task (see the module doc)."""
    return per_feature_l2_task(
        name="logistic_cancer", description=SUMMARY, dataset="breast_cancer",
        label_dtype=torch.float64,
        theta0_of=initial_params, losses=(train_loss, val_loss), metrics=metrics,
        initial_lam=INITIAL["lam"], search_space={"lam": SearchRange(1e-4, 10.0)}, steps=steps,
        defaults=DEFAULTS,
    )
