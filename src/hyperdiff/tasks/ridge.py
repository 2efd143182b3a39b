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

from ..hyperparams import HParamView, HyperParameters, scalar
from ..optimizers import sgd
from ..problem import Problem, make_problem
from ..typing import Batch, Params
from .base import SearchRange, Task, assemble, make_splits, standardize
from .datasets import load

SUMMARY = "ridge regression on diabetes with 65 polynomial features"
TUNES = "lam (1)"
DEFAULT_STEPS = 150
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "outer.optimizer": "rmsprop", "outer.lr": 0.1,
            "stop.max_steps": 30}
"""RMSprop rather than Adam: with one smooth hyperparameter Adam's momentum overshoots the
minimum and its long second-moment memory then stalls the last few percent of the way back."""
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


def build(
    *, steps: int | None = None, selection_fraction: float = 0.5, cv_folds: int = 0,
    data_seed: int = 0,
) -> Task:
    """The ridge task (see the module doc)."""
    steps = steps or DEFAULT_STEPS
    x_np, y_np = load("diabetes")
    x_all, y_all = torch.as_tensor(x_np, device="cpu"), torch.as_tensor(y_np, device="cpu")
    splits = make_splits(
        len(y_all), test=0.25, val=0.22, selection_fraction=selection_fraction, seed=data_seed
    )
    x = features(x_all, splits.train)
    y = (y_all - y_all[splits.train].mean()) / y_all[splits.train].std()
    hparams = HyperParameters(lam=scalar(INITIAL["lam"]))

    def batch_for(rows: Tensor) -> Batch:
        return x[rows], y[rows]

    def problem_for(train_rows: Tensor, val_rows: Tensor) -> Problem:
        return make_problem(
            train_loss, val_loss, hparams, {"w": x.new_zeros(x.shape[1])},
            optimizer=sgd(0.02, 0.9), train_data=batch_for(train_rows),
            val_data=batch_for(val_rows), steps=steps, probe=False,
        )

    return assemble(
        name="ridge_diabetes", description=SUMMARY, splits=splits, problem_for=problem_for,
        batch_for=batch_for, metrics=metrics, search_space={"lam": SearchRange(1e-4, 1e2)},
        cv_folds=cv_folds, data_seed=data_seed,
    )
