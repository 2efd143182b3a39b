"""A user task whose splits are torch data sets (loaded by tests/test_task_streaming.py as a
file): train on a shuffled DataLoader with its own generator over a map-style Dataset with
random augmentation in ``__getitem__``, validate on a DataLoader whose last batch is short, test
on a bare Dataset. float64, public API only."""

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import hyperdiff as hd

FEATURES, CLASSES = 5, 3


class Blobs(Dataset):
    """``n`` samples of a 3-class problem; ``noise`` > 0 adds augmentation drawn from torch's
    random state in ``__getitem__``. ``Blobs.reads`` counts every ``__getitem__`` call."""

    reads = 0

    def __init__(self, n, seed, noise=0.0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=gen, dtype=torch.float64)
        w = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(99),
                        dtype=torch.float64)
        self.y = (self.x @ w).argmax(1)
        self.noise = noise

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        Blobs.reads += 1
        x = self.x[i]
        if self.noise:
            x = x + self.noise * torch.randn(FEATURES, dtype=torch.float64)
        return x, self.y[i]


def make_net():
    torch.manual_seed(0)
    return hd.functional(torch.nn.Linear(FEATURES, CLASSES).double())


def build(steps=6, data_seed=0, test=None, train_batches=None, workers=0):
    net = make_net()

    def train_loss(params, h, batch):
        x, y = batch
        return F.cross_entropy(net(params, x), y) + h["wd"] * params["weight"].square().sum()

    def val_loss(params, h, batch):
        x, y = batch
        return F.cross_entropy(net(params, x), y)

    def metrics(params, h, batch):
        x, y = batch
        logits = net(params, x)
        return {"loss": float(F.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(-1) == y).double().mean())}

    train = train_batches if train_batches is not None else DataLoader(
        Blobs(200, 1, noise=0.1), batch_size=16, shuffle=True, num_workers=workers,
        generator=torch.Generator().manual_seed(5), timeout=60 if workers else 0)
    return hd.task(
        "stream_user", model=net, train_loss=train_loss, val_loss=val_loss,
        hparams=hd.HyperParameters(lr=hd.scalar(0.5), wd=hd.scalar(1e-2)),
        optimizer=hd.sgd("lr", 0.9), metrics=metrics, steps=steps,
        data=hd.given_splits(train=train, val=DataLoader(Blobs(60, 2), batch_size=25),
                             test=Blobs(70, 3) if test is None else test),
        defaults={"stop.max_steps": 3},
    )
