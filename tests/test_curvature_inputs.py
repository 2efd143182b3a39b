"""The curvature method's SGD tangent reads every parameter tensor's own momentum (s40
review): a per-tensor momentum was read from the first tensor alone, and the learning rate's
hypergradient was 9% off on a loss linear in theta, where the method is exact (a per-element
one crashed in torch). Reference: reverse mode on the same problem. Also its curvature_scale
message names every valid value."""

from __future__ import annotations

import pytest
import torch

import hyperdiff as hd

D = torch.float64


def linear_problem(momentum: str) -> hd.Problem:
    """A loss linear in theta (where curvature is exact with scale 0 and no forgetting), two
    parameter tensors, SGD whose momentum is a per-tensor or per-element hyperparameter."""
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.zeros(3, dtype=D), "b": torch.zeros(2, dtype=D)}
    ca, cb = torch.randn(3, generator=g, dtype=D), torch.randn(2, generator=g, dtype=D)

    def loss(p, h, batch):
        return (p["a"] @ ca + p["b"] @ cb) * batch.mean()

    kinds = {"per_tensor": hd.per_tensor(params, {"a": 0.9, "b": 0.5}),
             "per_element": hd.per_element(params, 0.7)}
    hparams = hd.HyperParameters(lr=hd.scalar(0.1), mom=kinds[momentum])
    batch = torch.ones(4, dtype=D)
    return hd.make_problem(loss, loss, hparams, params, optimizer=hd.sgd("lr", "mom"),
                           train_data=batch, val_data=batch, steps=6)


@pytest.mark.parametrize("momentum", ["per_tensor", "per_element"])
def test_the_learning_rates_hypergradient_with_a_tuned_momentum_per_tensor(momentum):
    problem = linear_problem(momentum)
    found = hd.methods.curvature(horizon=None, curvature_scale=0)(problem)
    exact = hd.reverse()(problem)
    torch.testing.assert_close(found.grad["lr"], exact.grad["lr"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("scale", [-1, float("inf"), True])
def test_a_bad_curvature_scale_names_every_valid_value(scale):
    with pytest.raises(hd.HyperdiffError, match=r"curvature_scale must be None, one of "
                       r"\[.*\], 0 or a number > 0"):
        hd.methods.curvature(curvature_scale=scale)
