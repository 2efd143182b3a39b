"""Hypergradient of the validation loss with respect to the learning rate and the weight decay
of a small MLP on scikit-learn's digits (the README's example)."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import hyperdiff as hd

digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
x_train, y_train, x_val, y_val = x[:1000], y[:1000], x[1000:1400], y[1000:1400]

torch.manual_seed(0)
net = hd.functional(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                        torch.nn.Linear(32, 10)))
hparams = hd.HyperParameters(lr=hd.scalar(0.1), weight_decay=hd.scalar(1e-3))


def train_loss(params, h, batch):
    xb, yb = batch
    l2 = sum((p**2).sum() for p in params.values())
    return F.cross_entropy(net(params, xb), yb) + 0.5 * h["weight_decay"] * l2


def val_loss(params, h, batch):
    xb, yb = batch
    return F.cross_entropy(net(params, xb), yb)


result = hd.hypergradient(
    train_loss, val_loss, hparams, net,
    optimizer=hd.sgd(lr="lr", momentum=0.9),
    train_data=hd.minibatches(x_train, y_train, batch_size=100),
    val_data=(x_val, y_val),
    steps=100,
    method=hd.reverse(),  # or hd.forward(), hd.finite_difference()
)
print(result)
print("dL_val/d lr           =", float(result.grad_natural["lr"]))
print("dL_val/d weight_decay =", float(result.grad_natural["weight_decay"]))
print("dL_val/d log lr       =", float(result.grad["lr"]))
