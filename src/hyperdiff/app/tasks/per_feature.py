"""A full-batch linear task on a bundled data set with one L2 strength per standardized input
feature, trained by heavy-ball SGD (lr 0.5, momentum 0.9) from ``theta0_of(d)`` (shared by the
two logistic tasks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from hyperdiff.app.tasks.base import SearchRange, standardize
from hyperdiff.app.tasks.datasets import load
from hyperdiff.app.tasks.spec import TaskSpec, task
from hyperdiff.app.tasks.splits import Splits
from hyperdiff.engine.optimizers import sgd
from hyperdiff.hparams.hyperparams import HyperParameters, per_feature
from hyperdiff.typing import Params


def standardize_inputs(data: tuple[Tensor, Tensor], rows: Splits) -> tuple[Tensor, Tensor]:
    """``(x, y)`` with the columns of ``x`` standardized on the training rows."""
    x, y = data
    return standardize(x, rows.train), y


def per_feature_l2_task(
    *, name: str, description: str, dataset: str, label_dtype: torch.dtype,
    theta0_of: Callable[[int], Params], losses: tuple[Callable[..., Tensor], Callable[..., Tensor]],
    metrics: Callable[..., dict[str, float]], initial_lam: float,
    search_space: Mapping[str, SearchRange], steps: int, defaults: Mapping[str, Any],
) -> TaskSpec:
    """The task spec (see the module doc); splits 50 / 25 / 25 (validation includes the
    selection split)."""
    x_np, y_np = load(dataset)
    x = torch.as_tensor(x_np, dtype=torch.float64, device="cpu")
    y = torch.as_tensor(y_np, dtype=label_dtype, device="cpu")
    train_loss, val_loss = losses
    return task(
        name, description=description, model=theta0_of(x.shape[1]), train_loss=train_loss,
        val_loss=val_loss, hparams=HyperParameters(lam=per_feature(initial_lam, x.shape[1])),
        optimizer=sgd(0.5, 0.9), data=(x, y), steps=steps, metrics=metrics,
        search_space=search_space, test_fraction=0.25, val_fraction=0.25,
        prepare=standardize_inputs, defaults=defaults, probe=False,
        stratify=True,
    )
