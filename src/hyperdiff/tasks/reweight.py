"""Learning to reweight noisy examples: digits with 30% of the training labels flipped.

Every training example ``i`` gets a weight ``w_i`` in (0, 1) (about a thousand
hyperparameters, all 0.5 at first, which is plain training). Inner problem: a one-hidden-layer
MLP trained by full-batch SGD with momentum on ``sum_i w_i CE_i / sum_i w_i`` for T steps;
outer loss: cross-entropy on the clean validation split. Hypergradient descent learns to
down-weight the flipped examples; a black-box search over one shared weight cannot, since a
constant weight cancels out of the normalized loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import HyperdiffError
from ..hyperparams import HParamView, HyperParameters, per_feature
from ..optimizers import sgd
from ..problem import Problem, make_problem
from ..typing import Batch, Params
from .base import SearchRange, Task, assemble, classification_metrics, make_splits
from .mlp import forward, init_mlp, load_digits_data

SUMMARY = "MLP on digits with 30% of the training labels flipped"
TUNES = "weight per training example (989)"
DEFAULT_STEPS = 60
NOISE = 0.3
HIDDEN = 32
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "outer.lr": 0.3, "stop.max_steps": 30}


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


def build(
    *, steps: int | None = None, selection_fraction: float = 0.5, cv_folds: int = 0,
    data_seed: int = 0,
) -> Task:
    """The noisy-label reweighting task (see the module doc)."""
    if cv_folds:
        raise HyperdiffError(
            "reweight_digits: task.cv_folds must be 0 (got "
            f"{cv_folds}): the weights belong to training examples and the validation "
            "examples must stay clean, so folds cannot mix them"
        )
    steps = steps or DEFAULT_STEPS
    x, y_clean = load_digits_data()
    splits = make_splits(
        len(y_clean), test=0.25, val=0.2, selection_fraction=selection_fraction, seed=data_seed
    )
    y, flipped = flip_labels(y_clean, splits.train, NOISE, data_seed)
    n_train = len(splits.train)
    hparams = HyperParameters(weight=per_feature(0.5, n_train, (0.0, 1.0)))
    theta0 = init_mlp(x.shape[1], HIDDEN, 10, seed=data_seed)
    train_batch = (x[splits.train], y[splits.train], torch.arange(n_train, device=x.device))

    def batch_for(rows: Tensor) -> Batch:
        return x[rows], y[rows]

    def problem_for(train_rows: Tensor, val_rows: Tensor) -> Problem:
        return make_problem(
            train_loss, val_loss, hparams, theta0, optimizer=sgd(0.5, 0.9),
            train_data=train_batch, val_data=batch_for(val_rows), steps=steps, probe=False,
        )

    return assemble(
        name="reweight_digits", description=SUMMARY, splits=splits, problem_for=problem_for,
        batch_for=batch_for, metrics=metrics, cv_folds=0, data_seed=data_seed,
        search_space={"weight": SearchRange(0.01, 0.99, False)},
        info={"flipped": flipped[splits.train]},
        summarize=lambda values: weight_summary(values["weight"], flipped[splits.train]),
    )


def weight_summary(weight: Tensor, flipped: Tensor) -> dict[str, float]:
    """Mean learned weight of the flipped and of the clean training examples."""
    return {"mean weight, flipped labels": float(weight[flipped].mean()),
            "mean weight, clean labels": float(weight[~flipped].mean())}
