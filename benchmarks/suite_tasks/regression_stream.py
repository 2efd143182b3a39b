"""Held out (never used to choose a default): the user's second task of issue 20, item 4. An
MLP regressor on 80000 streamed rows: scikit-learn's ``make_friedman1`` (20 features, 5 of them
used by the nonlinear target, Gaussian noise of scale 1) from ``data_seed``, the target
standardized; the training split is served by a ``DataLoader`` (batch 256, shuffled). The loss
is the mean squared error (no accuracy).

Tunes the AdamW warmup-cosine learning-rate schedule (peak, warmup, final) and the weight decay,
from the values a user would write first (peak 1e-3, final 10% of it, weight decay 0.01).

    hyperdiff run --task benchmarks/suite_tasks/regression_stream.py:build
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import make_friedman1
from suite_common import Splits, schedule_space, seeded_module, split_three, standardized, starts
from torch.utils.data import DataLoader, TensorDataset

import hyperdiff as hd

NAME = "regression_stream"
DEFAULT_STEPS = 400
BATCH_SIZE = 256
LR = 1e-3
LR_NAME = "lr_peak"
FEATURES, HIDDEN = 20, 64


def data(data_seed: int = 0, rows: int = 80000) -> Splits:
    """Standardized features (rows, 20) and targets (rows,) float32, split 60/20/20."""
    x, y = make_friedman1(n_samples=rows, n_features=FEATURES, noise=1.0,
                          random_state=data_seed)
    train, val, test = split_three(rows, data_seed)
    x = standardized(torch.tensor(x, dtype=torch.float32), train)
    target = torch.tensor(y, dtype=torch.float32)
    target = (target - target[train].mean()) / target[train].std()
    return {name: (x[idx], target[idx]) for name, idx in
            (("train", train), ("val", val), ("test", test))}


def make_mlp(seed: int) -> torch.nn.Module:
    """20 -> 64 (ReLU) -> 64 (ReLU) -> 1."""
    return seeded_module(seed, lambda: torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 1)))


def build(steps: int | None = None, data_seed: int = 0, lr_scale: float = 1.0) -> hd.tasks.TaskSpec:
    """The task (see the module doc); the initial peak lr is ``lr_scale`` x 1e-3."""
    steps = DEFAULT_STEPS if steps is None else steps
    net = hd.functional(make_mlp(data_seed))
    splits = data(data_seed)
    lr = hd.schedule("warmup_cosine", steps)
    lr_hparams = lr.hyperparameters(peak=LR * lr_scale, warmup=0.05, final=0.1)

    def loss(params, h, batch):
        x, y = batch
        return F.mse_loss(net(params, x)[:, 0], y)

    def metrics(params, h, batch):
        return {"loss": float(loss(params, h, batch))}

    train = DataLoader(TensorDataset(*splits["train"]), batch_size=BATCH_SIZE, shuffle=True)
    return hd.task(
        NAME, model=net, train_loss=loss, val_loss=loss, metrics=metrics,
        hparams=hd.HyperParameters({**lr_hparams, "wd": hd.scalar(1e-2)}),
        optimizer=hd.adamw(lr, weight_decay="wd"),
        data=hd.given_splits(train=train, val=splits["val"], test=splits["test"]),
        steps=steps, batch_size=BATCH_SIZE,
        search_space=schedule_space(lr=(1e-5, 1.0), wd=(1e-6, 1.0)),
        description="held out: MLP regressor on 80000 streamed rows (DataLoader)",
    )


globals().update(starts(build))
