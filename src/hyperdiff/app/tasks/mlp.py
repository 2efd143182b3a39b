"""A one-hidden-layer MLP on scikit-learn's digits, tuning its training recipe.

Inputs ``x`` (64 pixels scaled to [0, 1]), 10 classes. Model ``softmax(W2 relu(W1 x + b1) + b2)``
with 32 hidden units (the task param ``hidden``), trained by minibatch SGD with momentum for T
steps (batch 64). The hyperparameters are the whole recipe: a learning-rate schedule ``lr`` (one
value per inner step), the momentum (in (0, 1)) and a weight decay per parameter tensor
(``W1, b1, W2, b2``). Outer loss: validation cross-entropy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hyperdiff.app.tasks.base import SearchRange, classification_metrics
from hyperdiff.app.tasks.datasets import load
from hyperdiff.app.tasks.spec import TaskSpec, task
from hyperdiff.engine.optimizers import sgd
from hyperdiff.errors import positive_int
from hyperdiff.hparams.hyperparams import HParamView, HyperParameters, per_step, per_tensor, scalar
from hyperdiff.typing import Batch, Params

SUMMARY = "one-hidden-layer MLP on digits, minibatch SGD with momentum"
TUNES = "lr schedule (T), momentum (1), weight_decay per tensor (4)"
DEFAULT_STEPS = 60
HIDDEN = 32
BATCH_SIZE = 64
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "stop.max_steps": 30, "outer.samples": 2}
INITIAL = {"lr": 0.05, "momentum": 0.5, "weight_decay": 1e-3}


def load_digits_data() -> tuple[Tensor, Tensor]:
    """Digits inputs scaled to [0, 1] (1797 x 64, float32) and labels (int64)."""
    x, y = load("digits")
    return (torch.as_tensor(x / 16.0, dtype=torch.float32, device="cpu"),
            torch.as_tensor(y, dtype=torch.long, device="cpu"))


def init_mlp(inputs: int, hidden: int, classes: int, seed: int = 0) -> Params:
    """theta_0: uniform(+-1/sqrt(fan_in)) weights as torch.nn.Linear, zero biases."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
        return (torch.rand(shape, generator=gen, dtype=torch.float32, device="cpu") * 2 - 1
                ) / math.sqrt(fan_in)

    def zeros(size: int) -> Tensor:  # float32 whatever torch's default dtype, as the data
        return torch.zeros(size, dtype=torch.float32, device="cpu")

    return {"W1": uniform((inputs, hidden), inputs), "b1": zeros(hidden),
            "W2": uniform((hidden, classes), hidden), "b2": zeros(classes)}


def forward(params: Params, x: Tensor) -> Tensor:
    """Logits ``relu(x W1 + b1) W2 + b2``."""
    return torch.relu(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]


def train_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(forward(params, x), y)


def val_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(forward(params, x), y)


def metrics(params: Params, hparams: HParamView, batch: Batch) -> dict[str, float]:
    x, y = batch
    return classification_metrics(forward(params, x), y)


def build(*, steps: int = DEFAULT_STEPS, data_seed: int = 0, hidden: int = HIDDEN) -> TaskSpec:
    """The MLP training-recipe task (see the module doc) with ``hidden`` units (a task param:
    ``--set task.params.hidden=64``); theta_0 is drawn from ``data_seed``."""
    positive_int("mlp_digits", "hidden", hidden)
    x, y = load_digits_data()
    theta0 = init_mlp(x.shape[1], hidden, 10, seed=data_seed)
    hparams = HyperParameters(
        lr=per_step(steps, INITIAL["lr"]),
        momentum=scalar(INITIAL["momentum"], (0.0, 1.0)),
        weight_decay=per_tensor(theta0, INITIAL["weight_decay"]),
    )
    return task(
        "mlp_digits", description=SUMMARY, model=theta0, train_loss=train_loss,
        val_loss=val_loss, hparams=hparams,
        optimizer=sgd("lr", "momentum", weight_decay="weight_decay"), data=(x, y),
        steps=steps, batch_size=BATCH_SIZE, test_fraction=0.25, val_fraction=0.2,
        metrics=metrics, defaults=DEFAULTS, probe=False,
        search_space={"lr": SearchRange(1e-3, 1.0), "momentum": SearchRange(0.0, 0.99, False),
                      "weight_decay": SearchRange(1e-6, 1e-1)},
    )
