"""Reverse and forward mode against the closed form of T steps of gradient descent on ridge.

With A = X'X/n + lam I and b = X'y/n, gradient descent theta <- theta - a (A theta - b) gives,
in the eigenbasis A = Q diag(s + lam) Q',
    c_T = b~/d + r^T (c_0 - b~/d),   d = s + lam,   r = 1 - a d,
so the hypergradients for u = log lam and v = log a are closed-form derivatives of c_T.
"""

import pytest
import torch

import hyperdiff as hd

from conftest import rel_err

T = 25


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, generator=g, dtype=torch.float64) + 0.3 * torch.randn(30, generator=g, dtype=torch.float64)
    xv = torch.randn(15, 6, generator=g, dtype=torch.float64)
    yv = xv @ torch.randn(6, generator=g, dtype=torch.float64)
    theta0 = torch.randn(6, generator=g, dtype=torch.float64)
    return x, y, xv, yv, theta0


def closed_form(lam: float, lr: float):
    """Validation loss and d/dlog(lam), d/dlog(lr) after T steps, without autograd."""
    x, y, xv, yv, theta0 = _data()
    n, m = x.shape[0], xv.shape[0]
    s, q = torch.linalg.eigh(x.T @ x / n)
    b = q.T @ (x.T @ y / n)
    c0 = q.T @ theta0
    d = s + lam
    r = 1 - lr * d
    fixed = b / d
    c = fixed + r**T * (c0 - fixed)
    dc_dlam = -b / d**2 + T * r ** (T - 1) * (-lr) * (c0 - fixed) + r**T * b / d**2
    dc_dlr = T * r ** (T - 1) * (-d) * (c0 - fixed)
    resid = xv @ (q @ c) - yv
    value = 0.5 * (resid**2).mean()
    dl_dc = q.T @ (xv.T @ resid) / m
    return value, lam * (dl_dc @ dc_dlam), lr * (dl_dc @ dc_dlr)


def train_loss(p, h, batch):
    x, y = batch
    return 0.5 * ((x @ p["w"] - y) ** 2).mean() + 0.5 * h["lam"] * (p["w"] ** 2).sum()


def val_loss(p, h, batch):
    x, y = batch
    return 0.5 * ((x @ p["w"] - y) ** 2).mean()


@pytest.mark.parametrize("method", [hd.reverse(), hd.forward()], ids=["reverse", "forward"])
@pytest.mark.parametrize("lam, lr", [(0.3, 0.1), (0.01, 0.5)])
def test_matches_closed_form(method, lam, lr):
    x, y, xv, yv, theta0 = _data()
    hp = hd.HyperParameters(lam=hd.scalar(lam), lr=hd.scalar(lr))
    result = hd.hypergradient(
        train_loss, val_loss, hp, {"w": theta0}, optimizer=hd.sgd("lr"),
        train_data=(x, y), val_data=(xv, yv), steps=T, method=method,
    )
    value, g_lam, g_lr = closed_form(lam, lr)
    assert result.value == pytest.approx(float(value), rel=1e-12)
    expected = torch.stack([g_lam, g_lr])
    assert rel_err(result.vector, expected) <= 1e-8
    # natural units: dL/dlam = (dL/dlog lam) / lam
    assert float(result.grad_natural["lam"]) == pytest.approx(float(g_lam) / lam, rel=1e-8)
    assert float(result.grad_natural["lr"]) == pytest.approx(float(g_lr) / lr, rel=1e-8)


def test_finite_difference_matches_closed_form():
    x, y, xv, yv, theta0 = _data()
    hp = hd.HyperParameters(lam=hd.scalar(0.3), lr=hd.scalar(0.1))
    with pytest.warns(hd.CostWarning, match="cost 4 trainings"):
        result = hd.hypergradient(
            train_loss, val_loss, hp, {"w": theta0}, optimizer=hd.sgd("lr"),
            train_data=(x, y), val_data=(xv, yv), steps=T, method=hd.finite_difference(),
        )
    _, g_lam, g_lr = closed_form(0.3, 0.1)
    assert rel_err(result.vector, torch.stack([g_lam, g_lr])) <= 1e-7
