"""A user's task that takes params (loaded by tests/test_task_params.py as a file): ridge
regression on ``width`` synthetic features with one penalty per feature, so that the number of
hyperparameters, the data and theta_0 all depend on the params. ``CALLS`` records the keyword
arguments of every call of ``build``."""

import dataclasses

import torch

import hyperdiff as hd

CALLS: list[dict] = []


def build(*, steps: int = 8, data_seed: int = 0, width: int = 3, noise: float = 0.1,
          start: float = 0.5):
    CALLS.append({"steps": steps, "data_seed": data_seed, "width": width, "noise": noise,
                  "start": start})
    gen = torch.Generator().manual_seed(data_seed)
    x = torch.randn(80, width, generator=gen, dtype=torch.float64)
    y = x @ torch.linspace(1.0, -1.0, width, dtype=torch.float64)
    y = y + noise * torch.randn(80, generator=gen, dtype=torch.float64)

    def mse(params, h, batch):
        return ((batch[0] @ params["w"] - batch[1]) ** 2).mean()

    def train_loss(params, h, batch):
        return mse(params, h, batch) + (h["lam"] * params["w"].square()).sum()

    return hd.task(
        "ridge_params", model={"w": torch.zeros(width, dtype=torch.float64)},
        train_loss=train_loss, val_loss=mse,
        hparams=hd.HyperParameters(lam=hd.per_feature(start, width)),
        optimizer=hd.sgd(0.1), data=(x, y), steps=steps,
        defaults={"stop.max_steps": 3, "report.seeds": 1, "outer.lr": 0.2},
    )


def build_any(**options):
    """A factory that takes any params (``**options``) and passes them on to ``build``."""
    return build(**options)


def build_required(*, steps: int = 8, data_seed: int = 0, width: int):
    """A factory whose param ``width`` has no default."""
    return build(steps=steps, data_seed=data_seed, width=width)


def build_recommending_a_param(*, steps: int = 8, data_seed: int = 0, width: int = 3):
    """A factory whose task's defaults name a param (which the config must not take)."""
    spec = build(steps=steps, data_seed=data_seed, width=width)
    return dataclasses.replace(spec, defaults={**spec.defaults, "task.params.width": 9})
