"""MLP on a wide synthetic tabular set: 300 features of which 8 informative (4 redundant), 3
imbalanced classes (75% / 18% / 7%), 4000 rows drawn by scikit-learn's ``make_classification``
from ``data_seed``; the training split is served by a ``DataLoader`` (batch 64, shuffled).

Tunes the AdamW warmup-cosine learning-rate schedule (peak, warmup, final) and the weight decay.

    hyperdiff run --task benchmarks/suite_tasks/tabular_mlp.py:build
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import make_classification
from suite_common import (
    Splits,
    classification,
    lr_schedule,
    schedule_space,
    seeded_module,
    standardized_splits,
    starts,
)
from torch.utils.data import DataLoader, TensorDataset

import hyperdiff as hd

NAME = "tabular_mlp"
DEFAULT_STEPS = 150
BATCH_SIZE = 64
LR = 3e-3
LR_NAME = "lr_peak"
FEATURES, HIDDEN, CLASSES = 300, 64, 3


def data(data_seed: int = 0, rows: int = 4000) -> Splits:
    """Standardized features (rows, 300) float32 and labels (rows,), split 60/20/20."""
    x, y = make_classification(
        n_samples=rows, n_features=FEATURES, n_informative=8, n_redundant=4, n_classes=CLASSES,
        n_clusters_per_class=2, weights=[0.75, 0.18, 0.07], flip_y=0.01, random_state=data_seed)
    return standardized_splits(x, y, data_seed)


def make_mlp(seed: int) -> torch.nn.Module:
    """300 -> 64 (ReLU) -> 3."""
    return seeded_module(seed, lambda: torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN),
                                                    torch.nn.ReLU(),
                                                    torch.nn.Linear(HIDDEN, CLASSES)))


def build(steps: int | None = None, data_seed: int = 0, lr_scale: float = 1.0) -> hd.tasks.TaskSpec:
    """The task (see the module doc); the initial peak lr is ``lr_scale`` x 3e-3."""
    steps = DEFAULT_STEPS if steps is None else steps
    net = hd.functional(make_mlp(data_seed))
    splits = data(data_seed)
    lr, lr_hparams = lr_schedule(steps, LR * lr_scale)

    def loss(params, h, batch):
        x, y = batch
        return F.cross_entropy(net(params, x), y)

    def metrics(params, h, batch):
        x, y = batch
        return classification(net(params, x), y)

    train = DataLoader(TensorDataset(*splits["train"]), batch_size=BATCH_SIZE, shuffle=True)
    return hd.task(
        NAME, model=net, train_loss=loss, val_loss=loss, metrics=metrics,
        hparams=hd.HyperParameters({**lr_hparams, "wd": hd.scalar(1e-2)}),
        optimizer=hd.adamw(lr, weight_decay="wd"),
        data=hd.given_splits(train=train, val=splits["val"], test=splits["test"]),
        steps=steps, batch_size=BATCH_SIZE,
        search_space=schedule_space(lr=(1e-4, 1.0), wd=(1e-5, 1.0)),
        description="MLP on wide imbalanced synthetic tabular data (DataLoader)",
    )


globals().update(starts(build))
