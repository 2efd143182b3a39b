"""Few-shot sinusoid regression by meta-learning (Finn et al. 2017, MAML section 5.1).

Each task is a sinusoid ``y = A sin(x - phi)`` with ``A ~ U[0.1, 5]``, ``phi ~ U[0, pi]``,
``x ~ U[-5, 5]`` (:func:`~hyperdiff.app.tasks.few_shot.sinusoid_task`), ``shots`` support and
``queries`` query points. The model is a 1-40-40-1 ReLU MLP adapted by ``inner.steps`` SGD
steps (learning rate 0.01) on a task's support set, with mean squared error as both losses. It
tunes the initialization theta_0 (``hd.initialization``: MAML), and with ``meta_sgd = true``
also one learning rate per parameter tensor (Meta-SGD, per tensor). ``proximal = s > 0`` adds
iMAML's proximal term ``(s/2) ||theta - theta_0||^2`` to the training loss (run it with
``method.name = "implicit"``).

Run with ``outer.mode = "meta"`` (the default of this task): every outer step draws
``outer.meta_batch`` new tasks. The task's own splits are one task (the template: its support
set trains, its query set validates, another task's query set is the test split); the report's
``held_out_tasks`` adapts the initial (random) and the tuned theta_0 on held-out tasks and
scores their query sets (:mod:`hyperdiff.app.meta_report`).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from hyperdiff.app.tasks.few_shot import sinusoid_task
from hyperdiff.app.tasks.spec import TaskSpec, given_splits, task
from hyperdiff.engine.optimizers import sgd
from hyperdiff.errors import NONNEGATIVE, number, positive_int
from hyperdiff.hparams.hyperparams import (
    HParamView,
    HyperParameter,
    HyperParameters,
    per_tensor,
)
from hyperdiff.hparams.initialization import initialization, proximal
from hyperdiff.typing import Batch, Params

SUMMARY = "few-shot sinusoid regression, 1-40-40-1 MLP: MAML's initialization (meta-learning)"
TUNES = "theta_0 (1761 values); with meta_sgd, per-tensor learning rates (6)"
DEFAULT_STEPS = 5
HIDDEN = 40
INNER_LR = 0.01
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "outer.mode": "meta", "outer.meta_batch": 8,
            "outer.lr": 0.003, "outer.schedule": "constant", "stop.max_steps": 200,
            "stop.patience": 0, "method.name": "reverse"}


def init_mlp(seed: int) -> Params:
    """1-40-40-1 weights, uniform in +-1/sqrt(fan_in) as ``torch.nn.Linear``, from ``seed``."""
    return linear_layers([1, HIDDEN, HIDDEN, 1], seed)


def linear_layers(sizes: list[int], seed: int) -> Params:
    """``W{i}`` ``(sizes[i], sizes[i+1])`` and ``b{i}``, uniform in +-1/sqrt(fan_in) as
    ``torch.nn.Linear``, drawn from ``seed`` in order."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        bound = 1 / math.sqrt(fan_in)  # float32 whatever torch's default dtype, as the data
        params[f"W{i}"] = (torch.rand(fan_in, fan_out, generator=g, dtype=torch.float32,
                                      device="cpu") * 2 - 1) * bound
        params[f"b{i}"] = (torch.rand(fan_out, generator=g, dtype=torch.float32,
                                      device="cpu") * 2 - 1) * bound
    return params


def forward(params: Params, x: Tensor) -> Tensor:
    h = torch.relu(x @ params["W0"] + params["b0"])
    h = torch.relu(h @ params["W1"] + params["b1"])
    return h @ params["W2"] + params["b2"]


def mse(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    x, y = batch
    return ((forward(params, x) - y) ** 2).mean()


def with_proximal(strength: float):
    """iMAML's training loss: ``mse + (strength/2) ||theta - theta_0||^2``."""

    def loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
        return mse(params, hparams, batch) + proximal(params, hparams, "theta0", strength)

    return loss


def build(*, steps: int = DEFAULT_STEPS, data_seed: int = 0, shots: int = 10,
          queries: int = 10, meta_sgd: bool = False, proximal: float = 0.0) -> TaskSpec:
    """The sinusoid meta-learning task (module doc); theta_0 starts at a random init drawn
    from ``data_seed``."""
    shots = positive_int("sinusoid_maml", "shots", shots)
    queries = positive_int("sinusoid_maml", "queries", queries)
    strength = number("sinusoid_maml", "proximal", proximal, NONNEGATIVE)
    params = init_mlp(data_seed)
    specs: dict[str, HyperParameter] = {"theta0": initialization(params)}
    if meta_sgd:
        specs["lr"] = per_tensor(params, INNER_LR, "log")
    template, test = (sinusoid_task(i, shots=shots, queries=queries, seed=data_seed)
                      for i in (0, 1))

    def sample(index: int, seed: int) -> tuple[Batch, Batch]:
        drawn = sinusoid_task(0, shots=shots, queries=queries, seed=seed)  # the task is seed's
        return drawn.support, drawn.query

    return task(
        "sinusoid_maml", description=SUMMARY, model=params,
        train_loss=with_proximal(strength) if strength else mse, val_loss=mse,
        hparams=HyperParameters(specs), optimizer=sgd("lr" if meta_sgd else INNER_LR),
        data=given_splits(train=template.support, val=template.query, test=test.query),
        steps=steps, defaults=DEFAULTS, tasks=sample, cross_validation="meta-learning "
        "draws new tasks every outer step instead of folds",
    )
