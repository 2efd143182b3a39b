"""A GRU on a synthetic sequence task: 3000 sequences of 16 tokens drawn uniformly from 8
symbols; the label is the symbol among 0, 1, 2 that occurs most often (ties: the smaller), so
the model has to count over the whole sequence. Embedding 16 -> GRU 24 -> linear on the last
state, AdamW in minibatches of 64.

Tunes the warmup-cosine learning-rate schedule (peak, warmup, final) and the weight decay.

    hyperdiff run --task benchmarks/suite_tasks/gru_seq.py:build
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

import hyperdiff as hd

NAME = "gru_seq"
DEFAULT_STEPS = 100
BATCH_SIZE = 64
LR = 3e-3
LR_NAME = "lr_peak"
LENGTH, SYMBOLS, CLASSES = 16, 8, 3


def data(data_seed: int = 0, rows: int = 3000) -> Splits:
    """Token sequences (rows, 16) int64 and labels (rows,), split 60/20/20."""
    x = torch.randint(SYMBOLS, (rows, LENGTH), generator=seeded(data_seed))
    counts = torch.stack([(x == s).sum(1) for s in range(CLASSES)], 1)
    y = counts.argmax(1)  # first maximum on ties
    train, val, test = split_three(rows, data_seed)
    return {name: (x[idx], y[idx]) for name, idx in
            (("train", train), ("val", val), ("test", test))}


class Counter(torch.nn.Module):
    """Embedding -> one-layer GRU -> linear map of the last hidden state: (B, 16) -> (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(SYMBOLS, 16)
        self.gru = torch.nn.GRU(16, 24, batch_first=True)
        self.head = torch.nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(self.embed(x))
        return self.head(last[0])


def make_model(seed: int) -> torch.nn.Module:
    return seeded_module(seed, Counter)


def build(steps: int | None = None, data_seed: int = 0, lr_scale: float = 1.0) -> hd.tasks.TaskSpec:
    """The task (see the module doc); the initial peak lr is ``lr_scale`` x 3e-3."""
    steps = DEFAULT_STEPS if steps is None else steps
    net = hd.functional(make_model(data_seed))
    splits = data(data_seed)
    lr, lr_hparams = lr_schedule(steps, LR * lr_scale)

    def loss(params, h, batch):
        x, y = batch
        return F.cross_entropy(net(params, x), y)

    def metrics(params, h, batch):
        x, y = batch
        return classification(net(params, x), y)

    return hd.task(
        NAME, model=net, train_loss=loss, val_loss=loss, metrics=metrics,
        hparams=hd.HyperParameters({**lr_hparams, "wd": hd.scalar(1e-2)}),
        optimizer=hd.adamw(lr, weight_decay="wd"),
        data=hd.given_splits(train=splits["train"], val=splits["val"], test=splits["test"]),
        steps=steps, batch_size=BATCH_SIZE,
        search_space=schedule_space(lr=(1e-4, 1.0), wd=(1e-5, 1.0)),
        description="GRU counting symbols in synthetic sequences",
    )


globals().update(starts(build))
