"""A float64 user task for data-parallel online runs (tests/test_distributed_online.py): a tanh
MLP regression trained by heavy-ball SGD with a per-step learning rate, no BatchNorm (whose
statistics would be each rank's shard's), so 2 ranks can match one process to 1e-10."""

import torch

import hyperdiff as hd

ROWS, FEATURES, HIDDEN = 160, 3, 6


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, FEATURES, generator=gen, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True))


def build(steps=8, data_seed=0):
    gen = torch.Generator().manual_seed(data_seed)
    params = {"w1": 0.5 * torch.randn(FEATURES, HIDDEN, generator=gen, dtype=torch.float64),
              "b1": torch.zeros(HIDDEN, dtype=torch.float64),
              "w2": 0.5 * torch.randn(HIDDEN, 1, generator=gen, dtype=torch.float64)}

    def error(p, batch):
        x, y = batch
        return ((torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2).mean()

    def train_loss(p, h, batch):
        return error(p, batch) + 0.5 * h["wd"] * sum((v**2).sum() for v in p.values())

    def val_loss(p, h, batch):
        return error(p, batch)

    return hd.task(
        "online_dp", model=params, train_loss=train_loss, val_loss=val_loss,
        hparams=hd.HyperParameters(lr=hd.per_step(steps, 0.2), wd=hd.scalar(1e-2)),
        optimizer=hd.sgd(lr="lr", momentum=0.9), data=data(), steps=steps, batch_size=16,
    )
