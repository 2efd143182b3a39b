"""Ridge regression on scikit-learn's diabetes data, with degree-2 polynomial features.

Features ``x`` (65 standardized columns), targets ``y`` standardized on the training rows.
Inner problem: ``min_w mean((x w - y)^2) + lam * ||w||^2`` by full-batch heavy-ball SGD for T
steps from ``w = 0``; outer loss: validation mean squared error. One hyperparameter ``lam``.
With 65 features and about 230 training rows the problem overfits without ``lam``, so the best
``lam`` is interior (about 0.2 to 0.4 with the default split).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyperdiff.app.tasks.base import SearchRange, standardize
from hyperdiff.app.tasks.datasets import load
from hyperdiff.app.tasks.spec import TaskSpec, task
from hyperdiff.app.tasks.splits import Splits
from hyperdiff.engine.optimizers import sgd
from hyperdiff.hparams.hyperparams import HParamView, HyperParameters, scalar
from hyperdiff.typing import Batch, Params

SUMMARY = "ridge regression on diabetes with 65 polynomial features"
TUNES = "lam (1)"
DEFAULT_STEPS = 150
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "stop.max_steps": 30}
INITIAL = {"lam": 1e-2}


def features(x: Tensor, rows: Tensor) -> Tensor:
    """The 10 inputs and their 55 degree-2 products, standardized on ``rows`` (442 x 65)."""
    z = standardize(x, rows)
    i, j = torch.triu_indices(z.shape[1], z.shape[1])
    return standardize(torch.cat([z, z[:, i] * z[:, j]], dim=1), rows)


def mse(params: Params, batch: Batch) -> Tensor:
    x, y = batch
    return ((x @ params["w"] - y) ** 2).mean()


def train_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    """``mean((x w - y)^2) + lam ||w||^2``."""
    return mse(params, batch) + hparams["lam"] * (params["w"] ** 2).sum()


def val_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    """Validation mean squared error."""
    return mse(params, batch)


def metrics(params: Params, hparams: HParamView, batch: Batch) -> dict[str, float]:
    return {"loss": float(mse(params, batch))}


def closed_form(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """The exact ridge solution ``(x^T x / n + lam I)^-1 x^T y / n`` (a test oracle)."""
    n, p = x.shape
    eye = torch.eye(p, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(x.T @ x / n + lam * eye, x.T @ y / n)


def prepare(data: tuple[Tensor, Tensor], rows: Splits) -> tuple[Tensor, Tensor]:
    """Polynomial features and targets, both standardized on the training rows."""
    x_all, y_all = data
    y = (y_all - y_all[rows.train].mean()) / y_all[rows.train].std()
    return features(x_all, rows.train), y


def build(*, steps: int = DEFAULT_STEPS) -> TaskSpec:
    """The ridge task (see the module doc)."""
    x_np, y_np = load("diabetes")
    x_all, y_all = torch.as_tensor(x_np, device="cpu"), torch.as_tensor(y_np, device="cpu")
    width = 65  # 10 inputs and their 55 degree-2 products
    return task(
        "ridge_diabetes", description=SUMMARY,
        model={"w": torch.zeros(width, dtype=torch.float64, device="cpu")},
        train_loss=train_loss, val_loss=val_loss,
        hparams=HyperParameters(lam=scalar(INITIAL["lam"])), optimizer=sgd(0.02, 0.9),
        data=(x_all, y_all), steps=steps, test_fraction=0.25, val_fraction=0.22,
        prepare=prepare, metrics=metrics, search_space={"lam": SearchRange(1e-4, 1e2)},
        defaults=DEFAULTS, probe=False,
    )
