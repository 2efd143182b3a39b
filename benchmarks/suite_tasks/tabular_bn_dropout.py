"""Held out (never used to choose a default): the user's task of issue 20, item 1. An MLP with
BatchNorm and dropout on a large synthetic tabular set: 30000 rows of 40 features (12
informative, 6 redundant), 2 classes with 10% of the labels flipped, drawn by scikit-learn's
``make_classification`` from ``data_seed``; the training split is served by a ``DataLoader``
(batch 256, shuffled).

Tunes the AdamW warmup-cosine learning-rate schedule (peak, warmup, final) and the weight decay,
from the values a user would write first (peak 1e-3, final 10% of it, weight decay 0.01).

    hyperdiff run --task benchmarks/suite_tasks/tabular_bn_dropout.py:build
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import make_classification
from suite_common import (
    Splits,
    classification,
    schedule_space,
    seeded_module,
    standardized_splits,
    starts,
)
from torch.utils.data import DataLoader, TensorDataset

import hyperdiff as hd

NAME = "tabular_bn_dropout"
DEFAULT_STEPS = 300
BATCH_SIZE = 256
LR = 1e-3
LR_NAME = "lr_peak"
FEATURES, HIDDEN, CLASSES, DROPOUT = 40, 128, 2, 0.2


def data(data_seed: int = 0, rows: int = 30000) -> Splits:
    """Standardized features (rows, 40) float32 and labels (rows,), split 60/20/20."""
    x, y = make_classification(
        n_samples=rows, n_features=FEATURES, n_informative=12, n_redundant=6,
        n_classes=CLASSES, flip_y=0.1, class_sep=0.8, random_state=data_seed)
    return standardized_splits(x, y, data_seed)


def make_mlp(seed: int) -> torch.nn.Module:
    """40 -> 128 (BatchNorm, ReLU, dropout 0.2) -> 128 (the same) -> 2."""
    def block(n_in: int) -> list[torch.nn.Module]:
        return [torch.nn.Linear(n_in, HIDDEN), torch.nn.BatchNorm1d(HIDDEN), torch.nn.ReLU(),
                torch.nn.Dropout(DROPOUT)]

    return seeded_module(seed, lambda: torch.nn.Sequential(
        *block(FEATURES), *block(HIDDEN), torch.nn.Linear(HIDDEN, CLASSES)))


def build(steps: int | None = None, data_seed: int = 0, lr_scale: float = 1.0) -> hd.tasks.TaskSpec:
    """The task (see the module doc); the initial peak lr is ``lr_scale`` x 1e-3."""
    steps = DEFAULT_STEPS if steps is None else steps
    net = hd.functional(make_mlp(data_seed))
    splits = data(data_seed)
    lr = hd.schedule("warmup_cosine", steps)
    lr_hparams = lr.hyperparameters(peak=LR * lr_scale, warmup=0.05, final=0.1)

    def loss(params, h, batch, ctx):
        x, y = batch
        return F.cross_entropy(net(params, x, ctx), y)

    def metrics(params, h, batch, ctx):  # ctx.train is False: BatchNorm's running statistics
        x, y = batch
        return classification(net(params, x, ctx), y)

    train = DataLoader(TensorDataset(*splits["train"]), batch_size=BATCH_SIZE, shuffle=True)
    return hd.task(
        NAME, model=net, train_loss=loss, val_loss=loss, metrics=metrics,
        hparams=hd.HyperParameters({**lr_hparams, "wd": hd.scalar(1e-2)}),
        optimizer=hd.adamw(lr, weight_decay="wd"),
        data=hd.given_splits(train=train, val=splits["val"], test=splits["test"]),
        steps=steps, batch_size=BATCH_SIZE,
        search_space=schedule_space(lr=(1e-5, 1.0), wd=(1e-6, 1.0)),
        description="held out: MLP with BatchNorm and dropout on 30000 noisy tabular rows "
                    "(DataLoader)",
    )


globals().update(starts(build))
