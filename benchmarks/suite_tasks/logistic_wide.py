"""Logistic regression with one L2 penalty per feature on a wide bundled data set: scikit-learn's
breast-cancer data (569 rows, 30 features) widened with 470 columns of seeded Gaussian noise
(500 features for about 340 training rows), full-batch gradient descent with momentum.

Tunes the learning rate and the 500 per-feature penalties (the noise columns should get large
ones).

    hyperdiff run --task benchmarks/suite_tasks/logistic_wide.py:build
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from suite_common import Splits, seeded, split_three, standardized, starts

import hyperdiff as hd

NAME = "logistic_wide"
DEFAULT_STEPS = 100
LR = 0.1
LR_NAME = "lr"
NOISE_FEATURES = 470


def data(data_seed: int = 0) -> Splits:
    """Standardized features (569, 500) float32 (30 real, then noise) and 0/1 labels float32,
    split 60/20/20."""
    x, y = load_breast_cancer(return_X_y=True)
    real = torch.tensor(x, dtype=torch.float32)
    noise = torch.randn(len(real), NOISE_FEATURES, generator=seeded(data_seed))
    train, val, test = split_three(len(real), data_seed)
    x_all = standardized(torch.cat([real, noise], 1), train)
    y_all = torch.tensor(y, dtype=torch.float32)
    return {name: (x_all[idx], y_all[idx]) for name, idx in
            (("train", train), ("val", val), ("test", test))}


def logits(params, x):
    """``x @ w + b``: (B,)."""
    return x @ params["w"] + params["b"]


def build(steps: int | None = None, data_seed: int = 0, lr_scale: float = 1.0) -> hd.tasks.TaskSpec:
    """The task (see the module doc); the initial lr is ``lr_scale`` x 0.1."""
    steps = DEFAULT_STEPS if steps is None else steps
    splits = data(data_seed)
    features = splits["train"][0].shape[1]
    params = {"w": torch.zeros(features), "b": torch.zeros(())}

    def train_loss(p, h, batch):
        x, y = batch
        penalty = (h["l2"] * p["w"].double() ** 2).sum().to(p["w"].dtype)
        return F.binary_cross_entropy_with_logits(logits(p, x), y) + penalty

    def val_loss(p, h, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(logits(p, x), y)

    def metrics(p, h, batch):
        x, y = batch
        z = logits(p, x)
        return {"loss": float(F.binary_cross_entropy_with_logits(z, y)),
                "accuracy": float(((z > 0).float() == y).double().mean())}

    return hd.task(
        NAME, model=params, train_loss=train_loss, val_loss=val_loss, metrics=metrics,
        hparams=hd.HyperParameters(lr=hd.scalar(LR * lr_scale),
                                   l2=hd.per_feature(1e-3, features)),
        optimizer=hd.sgd("lr", 0.9),
        data=hd.given_splits(train=splits["train"], val=splits["val"], test=splits["test"]),
        steps=steps, batch_size=None,
        search_space={"lr": hd.tasks.SearchRange(1e-3, 10.0), "l2": hd.tasks.SearchRange(1e-6, 1.0)},
        description="logistic regression, 500 per-feature L2 penalties, 30 real + 470 noise features",
    )


globals().update(starts(build))
