"""A full-length training run whose best learning-rate schedule depends on its length.

An MLP 64-32-10 (ReLU) on scikit-learn's digits, trained by minibatch SGD with momentum 0.9
(batch 32) for N = 2000 steps by default (about 60 epochs of the training split). The
learning rate follows a warmup + cosine schedule defined on normalised time
(:mod:`hyperdiff.hparams.schedules`), so the same three hyperparameters ``lr_peak``, ``lr_warmup``
and ``lr_final`` describe it for any horizon; a weight decay ``wd`` (in the loss) completes the
recipe. Outer loss: validation cross-entropy.

This is the task for online tuning (``[outer] mode = "online"``): one run of N steps tunes the
schedule while it trains. Tuned offline on short unrolls (T = 50 or 200 steps), the schedule is
tuned for that horizon: a short unroll rewards a large, fast-decaying learning rate that gets
the validation loss down quickly, which is not what a 2000-step run needs (see
``benchmarks/horizon.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyperdiff.app.tasks.base import SearchRange
from hyperdiff.app.tasks.mlp import forward, init_mlp, load_digits_data, metrics, val_loss
from hyperdiff.app.tasks.spec import TaskSpec, task
from hyperdiff.engine.optimizers import sgd
from hyperdiff.hparams.hyperparams import HParamView, HyperParameters, scalar
from hyperdiff.hparams.schedules import schedule
from hyperdiff.typing import Batch, Params

SUMMARY = "MLP on digits trained 2000 minibatch steps: a schedule for the full horizon"
TUNES = "warmup-cosine lr schedule (peak, warmup, final), weight decay (4)"
DEFAULT_STEPS = 2000
HIDDEN = 32
BATCH_SIZE = 32
MOMENTUM = 0.9
# online defaults: the learning rate's tangents carried over every step under a diagonal
# curvature model (method "curvature"), forgotten over an optimization time sum_t lr_t of 20
# (about 500 steps at lr 0.04), and a hypergradient every 20 steps on all validation rows
# (< 2x one plain training); normalised SGD: hyper-step h moves the raw (log) values by
# 0.2 (1 + cos(pi h/100))/2 in L2, enough to travel a decade in the first dozen of the 100
# hyper-steps, and settling at the end (docs/online.md, benchmarks/horizon.py); windows of 20
# steps throughout (no outer.window_growth: the values measured there), tuned to the end (no
# outer.settle: with constant windows 0.75 leaves the last 25 of 100 hyper-steps out)
DEFAULTS = {"inner.steps": DEFAULT_STEPS, "outer.mode": "online", "outer.window": 20,
            "outer.window_growth": 0.0, "outer.settle": 1.0,
            "outer.optimizer": "sgd", "outer.normalize": True, "outer.lr": 0.2,
            "outer.schedule": "cosine", "outer.val_batch": 0, "method.name": "curvature",
            "method.horizon": 20.0, "method.horizon_unit": "lr"}
INITIAL = {"peak": 0.05, "warmup": 0.05, "final": 0.05, "wd": 1e-4}


def train_loss(params: Params, hparams: HParamView, batch: Batch) -> Tensor:
    x, y = batch
    decay = sum((p**2).sum() for n, p in params.items() if n.startswith("W"))
    return torch.nn.functional.cross_entropy(forward(params, x), y) + hparams["wd"] * decay


def hyperparameters(steps: int, peak: float = INITIAL["peak"]) -> HyperParameters:
    """The schedule's three parameters over ``steps`` and the weight decay."""
    lr = schedule("warmup_cosine", steps)
    specs = lr.hyperparameters(peak=peak, warmup=INITIAL["warmup"], final=INITIAL["final"])
    return HyperParameters({**specs, "wd": scalar(INITIAL["wd"])})


def build(*, steps: int = DEFAULT_STEPS, data_seed: int = 0) -> TaskSpec:
    """The full-horizon schedule task (see the module doc); theta_0 is drawn from
    ``data_seed``."""
    x, y = load_digits_data()
    return task(
        "horizon_digits", description=SUMMARY, model=init_mlp(x.shape[1], HIDDEN, 10,
                                                             seed=data_seed),
        train_loss=train_loss, val_loss=val_loss, hparams=hyperparameters(steps),
        optimizer=sgd(schedule("warmup_cosine", steps), MOMENTUM), data=(x, y), steps=steps,
        batch_size=BATCH_SIZE, test_fraction=0.25, val_fraction=0.2, metrics=metrics,
        defaults=DEFAULTS, probe=False,
        search_space={"lr_peak": SearchRange(1e-3, 1.0), "lr_warmup": SearchRange(0.01, 0.5),
                      "lr_final": SearchRange(0.01, 0.99, False),
                      "wd": SearchRange(1e-6, 1e-2)},
    )
