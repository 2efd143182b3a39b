"""Learning to reweight noisy examples: digits with 30% of the training labels flipped.

Every training example ``i`` gets a weight ``w_i`` in (0, 1) (about a thousand
hyperparameters, all 0.5 at first, which is plain training). Inner problem: a one-hidden-layer
MLP trained by full-batch SGD with momentum on ``sum_i w_i CE_i / sum_i w_i`` for T steps;
outer loss: cross-entropy on the clean validation split. Hypergradient descent learns to
down-weight the flipped examples; a black-box search over one shared weight cannot, since a
constant weight cancels out of the normalized loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from hyperdiff.app.tasks.base import SearchRange, classification_metrics
from hyperdiff.app.tasks.mlp import forward, init_mlp, load_digits_data
from hyperdiff.app.tasks.spec import TaskData, TaskSpec, task
from hyperdiff.app.tasks.splits import Splits
from hyperdiff.engine.optimizers import sgd
from hyperdiff.hparams.hyperparams import HParamView, HyperParameters, per_feature
from hyperdiff.typing import Batch, Params

SUMMARY = "MLP on digits with 30% of the training labels flipped"
TUNES = "weight per training example (989)"
DEFAULT_STEPS = 60
NOISE = 0.3
HIDDEN = 32
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "stop.max_steps": 30}


def flip_labels(y: Tensor, rows: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Copy of ``y`` where ``fraction`` of ``rows`` get a different random class; the mask."""
    gen = torch.Generator().manual_seed(seed + 2)
    flipped = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    order = torch.randperm(len(rows), generator=gen, device="cpu")
    chosen = rows[order[: int(round(fraction * len(rows)))]]
    flipped[chosen] = True
    shift = torch.randint(1, 10, (len(chosen),), generator=gen, device="cpu")
    noisy = y.clone()
    noisy[chosen] = (y[chosen] + shift) % 10
    return noisy, flipped


def train_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    """``sum_i w_i CE_i / sum_i w_i`` over the batch, ``i`` the example's training index."""
    x, y, index = batch
    w = hparams["weight"][index]
    ce = torch.nn.functional.cross_entropy(forward(params, x), y, reduction="none")
    return (w * ce).sum() / w.sum()


def val_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    x, y = batch[0], batch[1]
    return torch.nn.functional.cross_entropy(forward(params, x), y)


def metrics(params: Params, hparams: HParamView, batch: Batch) -> dict[str, float]:
    return classification_metrics(forward(params, batch[0]), batch[1])


def build(*, steps: int = DEFAULT_STEPS, data_seed: int = 0) -> TaskSpec:
    """The noisy-label reweighting task (see the module doc). The data carry a third column,
    each row's position among the training rows (``-1`` elsewhere), that indexes the weights."""
    x, y_clean = load_digits_data()

    def prepare(data: tuple[Tensor, Tensor], rows: Splits) -> tuple[Tensor, Tensor, Tensor]:
        x, y = data
        noisy, _ = flip_labels(y, rows.train, NOISE, data_seed)
        position = torch.full((len(y),), -1, dtype=torch.long, device=y.device)
        position[rows.train] = torch.arange(len(rows.train), device=y.device)
        return x, noisy, position

    def hparams(data: TaskData) -> HyperParameters:
        assert data.rows is not None
        return HyperParameters(weight=per_feature(0.5, len(data.rows.train), (0.0, 1.0)))

    return task(
        "reweight_digits", description=SUMMARY, model=init_mlp(x.shape[1], HIDDEN, 10,
                                                              seed=data_seed),
        train_loss=train_loss, val_loss=val_loss, hparams=hparams, optimizer=sgd(0.5, 0.9),
        data=(x, y_clean), steps=steps, test_fraction=0.25, val_fraction=0.2, prepare=prepare,
        metrics=metrics, search_space={"weight": SearchRange(0.01, 0.99, False)},
        summarize=summary, defaults=DEFAULTS, probe=False,
        cross_validation="the weights belong to training examples and the validation examples "
        "must stay clean, so folds cannot mix them",
    )


def flipped_rows(data: TaskData) -> Tensor:
    """Which training rows (in the order of the weights) got a flipped label."""
    assert data.rows is not None
    _, y_clean = load_digits_data()
    _, flipped = flip_labels(y_clean, data.rows.train, NOISE, data.data_seed)
    return flipped[data.rows.train]


def summary(values: Mapping[str, Tensor], data: TaskData) -> dict[str, float]:
    """Mean learned weight of the flipped and of the clean training examples."""
    weight, flipped = values["weight"], flipped_rows(data)
    return {"mean weight, flipped labels": float(weight[flipped].mean()),
            "mean weight, clean labels": float(weight[~flipped].mean())}
