"""Few-shot classification of procedural glyphs by meta-learning: 5-way 1-shot or 5-shot.

Each task is a 5-way episode of the glyph pool of
:func:`~hyperdiff.app.tasks.few_shot.glyph_pool` (1600 random-stroke classes, the last 400
held out), with ``shots`` support and ``queries`` query images (28 x 28) of each class, labels
``0 .. 4`` in the episode's order (:func:`~hyperdiff.app.tasks.few_shot.glyph_episode`).
Meta-training draws episodes of the meta-train classes only; the report's held-out tasks
(``held_out_tasks``, :mod:`hyperdiff.app.meta_report`) are episodes of the meta-test classes
only, so no class of the report was ever trained on. The model is a 784-64-5 ReLU MLP adapted
by ``inner.steps`` SGD steps (learning rate 0.5) on the support set, cross-entropy as both
losses, accuracy reported. It tunes theta_0 (``hd.initialization``: MAML), and with
``meta_sgd = true`` also one learning rate per parameter tensor (Meta-SGD, per tensor).

The task's own splits are one meta-train episode (its support set trains, its query set
validates) and the query set of one meta-test episode (test).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyperdiff.app.tasks.base import classification_metrics
from hyperdiff.app.tasks.few_shot import SIZE, glyph_episode, glyph_pool
from hyperdiff.app.tasks.sinusoid_maml import linear_layers
from hyperdiff.app.tasks.spec import TaskSpec, given_splits, task
from hyperdiff.engine.optimizers import sgd
from hyperdiff.engine.task_distribution import task_distribution
from hyperdiff.errors import HyperdiffError, positive_int
from hyperdiff.hparams.hyperparams import (
    HParamView,
    HyperParameter,
    HyperParameters,
    per_tensor,
)
from hyperdiff.hparams.initialization import initialization
from hyperdiff.typing import Batch, Params

SUMMARY = "5-way few-shot glyph classification, 784-64-5 MLP: MAML's initialization"
TUNES = "theta_0 (50565 values); with meta_sgd, per-tensor learning rates (4)"
WAYS = 5
HIDDEN = 64
INNER_LR = 0.5
DEFAULT_STEPS = 5
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "outer.mode": "meta", "outer.meta_batch": 4,
            "outer.lr": 0.001, "outer.schedule": "constant", "stop.max_steps": 100,
            "stop.patience": 0, "method.name": "reverse"}


def init_mlp(seed: int) -> Params:
    """784-64-5 weights uniform in +-1/sqrt(fan_in) as ``torch.nn.Linear``, from ``seed``."""
    return linear_layers([SIZE * SIZE, HIDDEN, WAYS], seed)


def forward(params: Params, images: Tensor) -> Tensor:
    """Logits ``(n, 5)`` of images ``(n, 1, 28, 28)``."""
    h = torch.relu(images.flatten(1) @ params["W0"] + params["b0"])
    return h @ params["W1"] + params["b1"]


def cross_entropy(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    images, labels = batch
    return torch.nn.functional.cross_entropy(forward(params, images), labels)


def metrics(params: Params, hparams: HParamView, batch: Batch) -> dict[str, float]:
    images, labels = batch
    return classification_metrics(forward(params, images), labels)


def build(*, steps: int = DEFAULT_STEPS, data_seed: int = 0, shots: int = 1,
          queries: int = 15, meta_sgd: bool = False) -> TaskSpec:
    """The glyph meta-learning task (module doc), ``shots`` 1 or 5; the glyph pool and the
    random theta_0 are drawn from ``data_seed``."""
    if shots not in (1, 5) or isinstance(shots, bool):
        raise HyperdiffError(f"glyphs_maml: shots must be 1 or 5 (got {shots!r})")
    queries = positive_int("glyphs_maml", "queries", queries)
    pool = glyph_pool(seed=data_seed)
    params = init_mlp(data_seed)
    specs: dict[str, HyperParameter] = {"theta0": initialization(params)}
    if meta_sgd:
        specs["lr"] = per_tensor(params, INNER_LR, "log")

    def episode(split: str, seed: int) -> tuple[Batch, Batch]:
        drawn = glyph_episode(pool, seed, split=split, ways=WAYS, shots=shots, queries=queries)
        return drawn.support, drawn.query  # the episode is seed's

    template, (_, test) = episode("train", 0), episode("test", 0)
    tasks = task_distribution(lambda index, seed: episode("train", seed),
                              name="glyphs_maml: tasks",
                              held_out=lambda index, seed: episode("test", seed))
    return task(
        "glyphs_maml", description=SUMMARY, model=params, train_loss=cross_entropy,
        val_loss=cross_entropy, metrics=metrics, hparams=HyperParameters(specs),
        optimizer=sgd("lr" if meta_sgd else INNER_LR),
        data=given_splits(train=template[0], val=template[1], test=test),
        steps=steps, defaults=DEFAULTS, tasks=tasks, cross_validation="meta-learning "
        "draws new tasks every outer step instead of folds",
    )
