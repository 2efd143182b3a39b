"""Pieces shared by the suite's task files (imported by name: a task file's own folder is on
``sys.path`` when hyperdiff loads it, and ``benchmarks/suite.py`` puts it there too).

Every suite task is written as a user would write it (``hd.task`` with ``hd.given_splits``);
its factory ``build(steps=None, data_seed=0, lr_scale=1.0)`` scales the initial learning rate
by ``lr_scale``, and :func:`starts` derives the factories of the starts 10x and 100x off
(``build_lr_x0p01`` ... ``build_lr_x100``) so that ``hyperdiff run --task FILE:build_lr_x10``
tunes from a learning rate ten times too large.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import hyperdiff as hd

START_FACTORS = (0.01, 0.1, 10.0, 100.0)
"""Initial learning rate over the task's own: 100x and 10x too small, 10x and 100x too large."""


def start_name(factor: float) -> str:
    """The attribute name of the factory started at ``factor`` x the task's lr.

    >>> start_name(0.01), start_name(10.0)
    ('build_lr_x0p01', 'build_lr_x10')
    """
    return "build_lr_x" + f"{factor:g}".replace(".", "p")


def starts(build: Callable[..., hd.tasks.TaskSpec]) -> dict[str, Callable[..., hd.tasks.TaskSpec]]:
    """``{start_name(f): factory}`` for every factor of :data:`START_FACTORS`; each factory
    takes ``steps`` and ``data_seed`` like ``build`` and starts at ``f`` x its lr."""

    def scaled(factor: float) -> Callable[..., hd.tasks.TaskSpec]:
        def factory(steps: int | None = None, data_seed: int = 0) -> hd.tasks.TaskSpec:
            return build(steps=steps, data_seed=data_seed, lr_scale=factor)

        factory.__name__ = start_name(factor)
        return factory

    return {start_name(f): scaled(f) for f in START_FACTORS}


def seeded_module(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``make()`` with torch's generators seeded by ``seed`` and restored afterwards: the same
    initial weights for the same seed, and the caller's random state untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make()


def lr_schedule(steps: int, peak: float) -> tuple[hd.schedules.Schedule, dict[str, hd.hyperparams.HyperParameter]]:
    """A warmup-cosine learning rate over ``steps`` (peak, warmup 5% of the run, final 5% of
    the peak): the schedule and its three hyperparameters ``lr_peak``, ``lr_warmup``,
    ``lr_final``."""
    lr = hd.schedule("warmup_cosine", steps)
    return lr, lr.hyperparameters(peak=peak, warmup=0.05, final=0.05)


def classification(logits: Tensor, y: Tensor) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``logits`` (B, C) for labels ``y`` (B,)."""
    return {"loss": float(F.cross_entropy(logits, y)),
            "accuracy": float((logits.argmax(-1) == y).double().mean())}


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (all data are drawn from one of these)."""
    return torch.Generator().manual_seed(seed)


def split_three(n: int, seed: int, fractions: tuple[float, float] = (0.2, 0.2)
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Row indices (train, val, test) of a seeded permutation of ``n`` rows; val and test
    take ``fractions`` of the rows. Disjoint and covering ``0..n-1``."""
    order = torch.randperm(n, generator=seeded(seed + 1))
    n_val, n_test = round(fractions[0] * n), round(fractions[1] * n)
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def standardized(x: Tensor, train: Tensor) -> Tensor:
    """Columns of ``x`` centred and scaled by the statistics of the ``train`` rows only."""
    mean, std = x[train].mean(0), x[train].std(0)
    return (x - mean) / torch.where(std > 0, std, torch.ones_like(std))


def standardized_splits(x: Any, y: Any, data_seed: int) -> Splits:
    """Features ``x`` (rows, d) as float32 standardized by the training rows, labels ``y``
    (rows,) as a tensor, split 60/20/20 by :func:`split_three` (numpy arrays or tensors)."""
    train, val, test = split_three(len(x), data_seed)
    features = standardized(torch.as_tensor(x, dtype=torch.float32), train)
    labels = torch.as_tensor(y)
    return {name: (features[idx], labels[idx]) for name, idx in
            (("train", train), ("val", val), ("test", test))}


Splits = dict[str, Any]
"""``{"train": ..., "val": ..., "test": ...}``: each a tuple of tensors, one row per example."""


def schedule_space(lr: tuple[float, float], wd: tuple[float, float]
                   ) -> dict[str, hd.tasks.SearchRange]:
    """Black-box search ranges of :func:`lr_schedule`'s hyperparameters and a weight decay
    ``wd``: the peak and the decay in log space, warmup and final fraction linear."""
    return {"lr_peak": hd.tasks.SearchRange(*lr), "lr_warmup": hd.tasks.SearchRange(0.01, 0.5, False),
            "lr_final": hd.tasks.SearchRange(0.01, 0.99, False), "wd": hd.tasks.SearchRange(*wd)}
