"""Shared fixtures: small float64 problems with independent oracles."""

from __future__ import annotations

import warnings

import pytest
import torch

import hyperdiff as hd


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (b the reference)."""
    return float((a - b).norm() / b.norm())


# one thread from the start, so that module-scoped fixtures run on it too
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed every test and run it on one torch thread (again: a CLI test may set its own).
    The test problems are tiny: intra-op threads only add OpenMP synchronisation, which turns
    into long waits whenever the other core is busy."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with hyperdiff's cost warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.CostWarning)
        return fn(*args, **kwargs)


def synthetic_regression(n: int = 120, d: int = 6, n_val: int = 60, seed: int = 0):
    """Well-conditioned linear-regression data in float64: (x, y, x_val, y_val)."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, generator=g, dtype=dtype)
    x_val = torch.randn(n_val, d, generator=g, dtype=dtype)
    y = x @ w + 0.3 * torch.randn(n, generator=g, dtype=dtype)
    y_val = x_val @ w + 0.3 * torch.randn(n_val, generator=g, dtype=dtype)
    return x, y, x_val, y_val


def sine_data(n: int = 24, d: int = 5, seed: int = 0, dtype: torch.dtype = torch.float64):
    """``(x, sin(sum_j x_j))`` with ``x`` standard normal, shapes (n, d) and (n, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return x, torch.sin(x.sum(1, keepdim=True))


def decayed_mse_losses(net):
    """``(train_loss, val_loss)`` for a functional model: mean squared error, plus
    ``sum_k wd_k ||p_k||^2`` (hyperparameter ``wd``, one per tensor or shared) in training."""

    def val_loss(p, h, batch, ctx):
        x, y = batch
        return ((net(p, x, ctx) - y) ** 2).mean()

    def train_loss(p, h, batch, ctx):
        return val_loss(p, h, batch, ctx) + sum(
            h.at("wd", param=k) * (v**2).sum() for k, v in p.items())

    return train_loss, val_loss

