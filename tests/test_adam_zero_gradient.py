"""Adam with gradient coordinates that are exactly zero along the whole run.

The second moment stays exactly 0 there, and d sqrt(v)/dv = inf at 0 turns every derivative
into 0 * inf = NaN unless the square root's derivative is taken as 0 (the true value)."""

import pytest
import torch

import hyperdiff as hd
import hyperdiff.engine.optimizers as optimizers

from conftest import quiet, rel_err


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    x[:, 2] = 0.0  # feature 2 never has a gradient: its weight row stays exactly 0
    y = torch.randint(0, 3, (20,), generator=g)
    xv = torch.randn(10, 4, generator=g, dtype=torch.float64)
    yv = torch.randint(0, 3, (10,), generator=g)
    params = {"w": torch.zeros(4, 3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    hp = hd.HyperParameters(lr=hd.scalar(0.05), b2=hd.scalar(0.99, (0.0, 1.0)),
                            l2=hd.per_feature(1e-2, size=4))

    def train_loss(p, h, batch):
        xb, yb = batch
        fit = torch.nn.functional.cross_entropy(xb @ p["w"] + p["b"], yb)
        return fit + (h["l2"][:, None] * p["w"] ** 2).sum()

    def val_loss(p, h, batch):
        xb, yb = batch
        return torch.nn.functional.cross_entropy(xb @ p["w"] + p["b"], yb)

    return hd.make_problem(
        train_loss, val_loss, hp, params, optimizer=hd.adam("lr", betas=(0.9, "b2")),
        train_data=(x, y), val_data=(xv, yv), steps=12,
    )


@pytest.mark.parametrize("method", [hd.reverse(), hd.forward()], ids=["reverse", "forward"])
def test_finite_and_matches_finite_differences(method):
    problem = _problem()
    result = method(problem)
    assert torch.isfinite(result.vector).all()
    assert float(result.params["w"][2].abs().max()) == 0.0  # the zero row stayed zero
    fd = quiet(hd.finite_difference(), problem)
    assert rel_err(result.vector, fd.vector) <= 1e-6
    assert float(result.grad["l2"][2]) == 0.0


def test_plain_sqrt_would_give_nan(monkeypatch):
    """The oracle for the test above: without the safe square root the answer is NaN."""
    problem = _problem()
    monkeypatch.setattr(optimizers, "safe_sqrt", torch.sqrt)
    with pytest.raises(hd.NonFiniteError, match="hypergradient of .* is not finite"):
        hd.reverse()(problem)
