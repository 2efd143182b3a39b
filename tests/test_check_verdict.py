"""Issue 18, class 5: ``check`` gives a verdict on a realistic model: the finite-difference
reference at several steps with its own error estimate, entries it cannot resolve called
"reference unreliable" instead of blaming a method, randomness replayed identically in every
training, and advice that names only APIs that exist."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hyperdiff as hd
from hyperdiff.methods.finite_difference import finite_difference

from conftest import rel_err

D = torch.float64


def dropout_in_the_loss(steps: int = 8) -> hd.Problem:
    """Logistic regression whose train loss draws dropout from the global generator (outside
    any ``hd.functional`` model), float64."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=D)
    y = (x[:, 0] - x[:, 1] > 0).long()

    def train(p, h, b):
        return F.cross_entropy(F.dropout(b[0], 0.3) @ p["W"], b[1]) + h["wd"] * p["W"].square().sum()

    def val(p, h, b):
        return F.cross_entropy(b[0] @ p["W"], b[1])

    return hd.make_problem(train, val, hd.HyperParameters(wd=hd.scalar(1e-2)),
                           {"W": torch.zeros(5, 2, dtype=D)}, optimizer=hd.sgd(0.5),
                           train_data=hd.minibatches(x, y, batch_size=16), val_data=(x, y),
                           steps=steps, probe=False)


def test_randomness_drawn_in_the_loss_is_replayed_in_every_training():
    problem = dropout_in_the_loss()
    coarse = finite_difference(1e-4, warn=False)(problem).vector
    fine = finite_difference(1e-6, warn=False)(problem).vector
    # the same masks in every training: the difference quotients converge (with fresh masks
    # each training they are (L+ - L-) / 2h ~ noise / h, orders of magnitude apart)
    assert rel_err(coarse, fine) < 1e-6
    assert rel_err(hd.reverse()(problem).vector, fine) < 1e-6
    state = torch.get_rng_state()
    hd.reverse()(problem)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
