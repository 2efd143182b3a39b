"""Full-batch tasks with a tuned learning rate, for the online curvature scale on a fixed batch
(``benchmarks/online_fixed_batch.py``, docs/online.md, session 34).

Each is written as a user would (``hd.task`` with ``hd.given_splits``, ``batch_size=None``: every
step trains on the whole training split) and has factories ``NAME_xF`` started at F x its
learning rate (F = 0.01, 0.1, 1, 10, 100):

- ``cancer``: logistic regression on scikit-learn's breast-cancer data (30 standardized
  features), heavy-ball GD (momentum 0.9), tunes the lr and 30 per-feature L2 penalties;
- ``mlp_sgd``: a 64-32-10 tanh MLP on scikit-learn's digits, heavy-ball GD, tunes the lr and
  a weight decay;
- ``mlp_adamw``: the same MLP with AdamW, tunes the lr and the decoupled weight decay;
- ``ridge``: least squares on diabetes with squares and products of its features (25 of
  them), heavy-ball GD, tunes the lr and 25 per-feature L2 penalties.

    hyperdiff run --task benchmarks/fixed_batch_tasks.py:mlp_sgd_x1 --set outer.mode=online
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes, load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent / "suite_tasks"))
import logistic_wide
from suite_common import Splits, split_three, standardized

import hyperdiff as hd

STEPS = 100
STARTS = {"x0p01": 0.01, "x0p1": 0.1, "x1": 1.0, "x10": 10.0, "x100": 100.0}


def splits(x: torch.Tensor, y: torch.Tensor, data_seed: int = 0) -> Splits:
    """Train / val / test (60/20/20, seeded), features standardized on the training rows."""
    train, val, test = split_three(len(x), data_seed)
    x = standardized(x, train)
    return {n: (x[i], y[i]) for n, i in (("train", train), ("val", val), ("test", test))}


def data(s: Splits) -> hd.tasks.GivenSplits:
    return hd.given_splits(train=s["train"], val=s["val"], test=s["test"])


def cancer(lr_scale: float = 1.0, data_seed: int = 0) -> hd.tasks.TaskSpec:
    s = {k: (x[:, :30], y) for k, (x, y) in logistic_wide.data(data_seed).items()}
    params = {"w": torch.zeros(30), "b": torch.zeros(())}

    def val_loss(p, h, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(x @ p["w"] + p["b"], y)

    def train_loss(p, h, batch):
        return val_loss(p, h, batch) + (h["l2"] * p["w"] ** 2).sum()

    return hd.task("fixed_cancer", model=params, train_loss=train_loss, val_loss=val_loss,
                   hparams=hd.HyperParameters(lr=hd.scalar(0.1 * lr_scale),
                                              l2=hd.per_feature(1e-3, 30)),
                   optimizer=hd.sgd("lr", 0.9), data=data(s), steps=STEPS, batch_size=None)


def digits_splits(data_seed: int = 0) -> Splits:
    x, y = load_digits(return_X_y=True)
    return splits(torch.tensor(x, dtype=torch.float32), torch.tensor(y), data_seed)


def mlp() -> hd.FunctionalModel:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return hd.functional(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                                 torch.nn.Linear(32, 10)))


def mlp_task(name: str, optimizer: hd.optimizers.Optimizer, lr: float, wd: float,
             data_seed: int) -> hd.tasks.TaskSpec:
    net = mlp()

    def loss(p, h, batch):
        x, y = batch
        return F.cross_entropy(net(p, x), y)

    return hd.task(name, model=net, train_loss=loss, val_loss=loss,
                   hparams=hd.HyperParameters(lr=hd.scalar(lr), wd=hd.scalar(wd)),
                   optimizer=optimizer, data=data(digits_splits(data_seed)), steps=STEPS,
                   batch_size=None)


def mlp_sgd(lr_scale: float = 1.0, data_seed: int = 0) -> hd.tasks.TaskSpec:
    return mlp_task("fixed_mlp_sgd", hd.sgd("lr", 0.9, weight_decay="wd"), 0.1 * lr_scale,
                    1e-3, data_seed)


def mlp_adamw(lr_scale: float = 1.0, data_seed: int = 0) -> hd.tasks.TaskSpec:
    return mlp_task("fixed_mlp_adamw", hd.adamw("lr", weight_decay="wd"), 0.01 * lr_scale,
                    1e-2, data_seed)


def ridge(lr_scale: float = 1.0, data_seed: int = 0) -> hd.tasks.TaskSpec:
    x, y = load_diabetes(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    x = torch.cat([x, x ** 2, x[:, :5] * x[:, 5:]], 1)
    s = splits(x, (y - y.mean()) / y.std(), data_seed)
    d = x.shape[1]
    params = {"w": torch.zeros(d), "b": torch.zeros(())}

    def val_loss(p, h, batch):
        x, y = batch
        return ((x @ p["w"] + p["b"] - y) ** 2).mean()

    def train_loss(p, h, batch):
        return val_loss(p, h, batch) + (h["l2"] * p["w"] ** 2).sum()

    return hd.task("fixed_ridge", model=params, train_loss=train_loss, val_loss=val_loss,
                   hparams=hd.HyperParameters(lr=hd.scalar(0.05 * lr_scale),
                                              l2=hd.per_feature(1e-3, d)),
                   optimizer=hd.sgd("lr", 0.9), data=data(s), steps=STEPS, batch_size=None)


TASKS: dict[str, Callable[..., hd.tasks.TaskSpec]] = {
    "cancer": cancer, "mlp_sgd": mlp_sgd, "mlp_adamw": mlp_adamw, "ridge": ridge}


def _started(build: Callable[..., hd.tasks.TaskSpec], factor: float
             ) -> Callable[..., hd.tasks.TaskSpec]:
    def factory(data_seed: int = 0) -> hd.tasks.TaskSpec:
        return build(factor, data_seed)

    return factory


globals().update({f"{name}_{tag}": _started(build, factor)
                  for name, build in TASKS.items() for tag, factor in STARTS.items()})
