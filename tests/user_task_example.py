"""A user's own task, written only with the public API (loaded by tests/test_user_tasks.py as
a module and as a file): a BatchNorm MLP on synthetic 3-class data, float64."""

import torch
import torch.nn.functional as F

import hyperdiff as hd

ROWS, FEATURES, CLASSES = 150, 4, 3


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, FEATURES, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
    return x * 3.0 + 1.0, y


def make_net(seed=0):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.BatchNorm1d(8),
                                 torch.nn.ReLU(), torch.nn.Linear(8, CLASSES)).double()
    return module


def build(steps=6, data_seed=0):
    module = make_net(data_seed)
    net = hd.functional(module)

    def train_loss(params, h, batch, ctx):
        x, y = batch
        decay = sum(p.square().sum() for p in params.values())
        return F.cross_entropy(net(params, x, ctx), y) + h["wd"] * decay

    def val_loss(params, h, batch, ctx):
        x, y = batch
        return F.cross_entropy(net(params, x, ctx), y)

    def metrics(params, h, batch, ctx):
        x, y = batch
        logits = net(params, x, ctx)
        return {"loss": float(F.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(-1) == y).double().mean())}

    return hd.task(
        "user_bn", model=net, train_loss=train_loss, val_loss=val_loss,
        hparams=hd.HyperParameters(lr=hd.per_step(steps, 0.3), wd=hd.scalar(1e-3)),
        optimizer=hd.sgd("lr", 0.5), data=data(), steps=steps, batch_size=32,
        metrics=metrics, defaults={"outer.lr": 0.1, "stop.max_steps": 3, "report.seeds": 1},
    )


NOT_A_FACTORY = 42


def raises():
    raise RuntimeError("the data server is down")


def returns_a_dict():
    return {"name": "not a task"}
