"""A small CNN with BatchNorm on procedurally drawn 32x32 grey images of 10 classes: filled
disk, ring, filled square, square outline, plus, X, horizontal stripes, vertical stripes,
checkerboard, triangle; random position, size, stripe period and phase, brightness, and
Gaussian pixel noise (sd 0.35), 2400 images drawn from ``data_seed``. conv 3x3 (8) -> BN ->
ReLU -> pool -> conv 3x3 (16) -> BN -> ReLU -> pool -> pool -> linear, SGD with momentum 0.9
in minibatches of 32.

Tunes the warmup-cosine learning-rate schedule (peak, warmup, final) and the weight decay.

    hyperdiff run --task benchmarks/suite_tasks/shapes_cnn.py:build
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from suite_common import (
    Splits,
    classification,
    lr_schedule,
    schedule_space,
    seeded,
    seeded_module,
    split_three,
    starts,
)
from torch import Tensor

import hyperdiff as hd

NAME = "shapes_cnn"
DEFAULT_STEPS = 60
BATCH_SIZE = 32
LR = 0.05
LR_NAME = "lr_peak"
SIZE, CLASSES = 32, 10


def draw(labels: Tensor, gen: torch.Generator) -> Tensor:
    """Images (N, 1, 32, 32) in about [0, 1] of the classes ``labels`` (N,)."""
    n = len(labels)
    u = torch.rand(n, 6, generator=gen)
    cx, cy = 10 + 12 * u[:, :1, None], 10 + 12 * u[:, 1:2, None]   # centre (N, 1, 1)
    r = 5 + 4 * u[:, 2:3, None]                                   # size
    period, phase = 3 + 4 * u[:, 3:4, None], 6.3 * u[:, 4:5, None]
    grid = torch.arange(SIZE, dtype=torch.float32)
    ys, xs = grid[None, :, None], grid[None, None, :]
    dx, dy = xs - cx, ys - cy
    d, box = (dx**2 + dy**2).sqrt(), torch.maximum(dx.abs(), dy.abs())
    shapes = torch.stack([
        d < r, (d - r).abs() < 1.5, box < r, (box - r).abs() < 1.2,
        ((dx.abs() < 1.5) & (dy.abs() < r)) | ((dy.abs() < 1.5) & (dx.abs() < r)),
        (((dx - dy).abs() < 1.5) | ((dx + dy).abs() < 1.5)) & (box < r),
        torch.sin(6.283 * ys / period + phase).expand(n, SIZE, SIZE) > 0,
        torch.sin(6.283 * xs / period + phase).expand(n, SIZE, SIZE) > 0,
        (torch.sin(6.283 * xs / period + phase) * torch.sin(6.283 * ys / period)) > 0,
        (dy.abs() < r) & (dx.abs() <= (dy + r) / 2),
    ], 1).float()                                                  # (N, 10, 32, 32)
    image = shapes[torch.arange(n), labels] * (0.6 + 0.4 * u[:, 5:6, None])
    noise = 0.35 * torch.randn(n, SIZE, SIZE, generator=gen)
    return (image + noise)[:, None]


def data(data_seed: int = 0, rows: int = 2400) -> Splits:
    """Images (rows, 1, 32, 32) float32 and labels (rows,), balanced, split 60/20/20."""
    gen = seeded(data_seed)
    labels = torch.arange(rows) % CLASSES
    images = draw(labels, gen)
    train, val, test = split_three(rows, data_seed)
    return {name: (images[idx], labels[idx]) for name, idx in
            (("train", train), ("val", val), ("test", test))}


def make_cnn(seed: int) -> torch.nn.Module:
    return seeded_module(seed, lambda: torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, CLASSES),
    ))


def build(steps: int | None = None, data_seed: int = 0, lr_scale: float = 1.0) -> hd.tasks.TaskSpec:
    """The task (see the module doc); the initial peak lr is ``lr_scale`` x 0.05."""
    steps = DEFAULT_STEPS if steps is None else steps
    net = hd.functional(make_cnn(data_seed))
    splits = data(data_seed)
    lr, lr_hparams = lr_schedule(steps, LR * lr_scale)

    def loss(params, h, batch, ctx):
        x, y = batch
        return F.cross_entropy(net(params, x, ctx), y)

    def metrics(params, h, batch, ctx):  # ctx.train is False: BatchNorm's running statistics
        x, y = batch
        return classification(net(params, x, ctx), y)

    return hd.task(
        NAME, model=net, train_loss=loss, val_loss=loss, metrics=metrics,
        hparams=hd.HyperParameters({**lr_hparams, "wd": hd.scalar(1e-4)}),
        optimizer=hd.sgd(lr, 0.9, weight_decay="wd"),
        data=hd.given_splits(train=splits["train"], val=splits["val"], test=splits["test"]),
        steps=steps, batch_size=BATCH_SIZE,
        search_space=schedule_space(lr=(1e-3, 10.0), wd=(1e-6, 1e-1)),
        description="CNN with BatchNorm on procedural 32x32 shapes and textures (10 classes)",
    )


globals().update(starts(build))
