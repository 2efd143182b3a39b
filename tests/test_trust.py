"""Numbers the user must be able to trust: the float32 check, reversible mode's momentum
rounding, and peak memory from torch's public APIs."""

from __future__ import annotations

import inspect
import math
import random
import sys
from pathlib import Path

import pytest
import torch

import hyperdiff as hd
from hyperdiff.diagnose.check import check, peak_memory
from hyperdiff.methods.finite_difference import finite_difference
from hyperdiff.methods.reversible import DENOMINATOR, InfoBuffer, quantised, scale_down, scale_up

from conftest import rel_err


def float32_ridge(projection: torch.Tensor | None = None):
    """Ridge with a small L2 strength (1e-6): dL/du is tiny next to L, the case where float32
    finite differences are mostly rounding noise."""
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(64, 8, generator=g), torch.randn(32, 8, generator=g)
    w = torch.randn(8, generator=g)
    y, yv = x @ w + 0.3 * torch.randn(64, generator=g), xv @ w

    def features(b):
        return b[0] if projection is None else b[0] @ projection

    def val(p, h, b):
        return ((features(b) @ p["w"] - b[1]) ** 2).mean()

    def train(p, h, b):
        return val(p, h, b) + h["lam"] * (p["w"] ** 2).sum()

    return hd.make_problem(train, val, hd.HyperParameters(lam=hd.scalar(1e-6)),
                           {"w": torch.zeros(8)}, optimizer=hd.sgd(0.05, 0.9),
                           train_data=hd.minibatches(x, y, batch_size=16), val_data=(xv, yv),
                           steps=40, probe=False)


def test_check_of_a_float32_problem_reports_agreement():
    problem = float32_ridge()
    report = check(problem, memory=False)
    rows = {r.label: r for r in report.rows}
    # the float64 reference: reverse mode in float32 agrees to its own rounding
    assert rows["reverse"].rel_error < 1e-4 and rows["forward"].rel_error < 1e-4
    assert report.reference_dtype == "float64" and "float64 copy" in report.table()
    # what the old check did: float32 finite differences, whose noise is the "error"
    fd32 = finite_difference(coordinates=report.coordinates, warn=False)(problem)
    c = report.coordinates
    assert rel_err(hd.reverse()(problem).vector[c], fd32.vector[c]) > 10 * rows["reverse"].rel_error
    assert rel_err(fd32.vector[c], torch.tensor(report.reference)) > 1e-2


def test_check_states_the_reference_noise_when_float64_is_impossible():
    # a float32 constant inside the loss: the float64 copy fails (mixed-dtype matmul)
    problem = float32_ridge(projection=torch.eye(8))
    report = check(problem, memory=False)
    assert report.reference_dtype == "float32"
    assert report.reference_noise is not None and report.reference_noise > 1e-2
    assert "so smaller errors are not measured" in report.table()
    assert "reference unreliable for these entries: lam" in report.verdict
    assert "rounding noise of float32 differences" in report.verdict
    rows = {r.label: r for r in report.rows}
    assert rows["reverse"].rel_error < 3 * report.reference_noise


def logistic(momentum, steps, hparams=None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] - x[:, 1] > 0).long()
    batches = [(x[i * 12 : (i + 1) * 12], y[i * 12 : (i + 1) * 12]) for i in range(4)]

    def val(p, h, b):
        return torch.nn.functional.cross_entropy(b[0] @ p["W"] + p["b"], b[1])

    def train(p, h, b):
        return val(p, h, b) + h["wd"] * p["W"].square().sum()

    params = {"W": torch.zeros(5, 2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    hparams = hparams or hd.HyperParameters(lr=hd.scalar(0.2), wd=hd.scalar(1e-2))
    return hd.make_problem(train, val, hparams, params, optimizer=hd.sgd("lr", momentum), train_data=batches,
                           val_data=(x[:16], y[:16]), steps=steps, probe=False)


@pytest.mark.parametrize("mu", [0.9, 0.123456789, math.pi / 4])
def test_reversible_with_momenta_that_are_not_multiples_of_2_to_the_minus_31(mu):
    assert round(mu * DENOMINATOR) != mu * DENOMINATOR  # not representable as n / 2^31
    assert abs(quantised(mu) - mu) <= 1e-16  # the closest fraction n / d with d <= 2^31
    got = hd.reversible()(logistic(mu, 100))
    assert got.diagnostics["momentum_rounding"] <= 1e-16
    # reverse mode at the same momentum, to the fixed-point rounding (the README's ~1e-12)
    assert rel_err(got.vector, hd.reverse()(logistic(mu, 100)).vector) < 2e-12


def test_reversible_momentum_hyperparameter_matches_reverse():
    hp = hd.HyperParameters(lr=hd.scalar(0.2), wd=hd.scalar(1e-2), mu=hd.scalar(0.9, (0.0, 1.0)))
    problem = logistic("mu", 60, hp)
    assert rel_err(hd.reversible()(problem).vector, hd.reverse()(problem).vector) < 2e-12


def test_scale_down_with_any_fraction_is_undone_exactly():
    rng = random.Random(0)
    numel = 64
    info = InfoBuffer(numel)
    x0 = torch.tensor([rng.randrange(-2**60, 2**60) for _ in range(numel)])
    x, history = x0.clone(), []
    for _ in range(20):
        d = torch.tensor([rng.randrange(1, DENOMINATOR + 1) for _ in range(numel)])
        n = torch.tensor([rng.randrange(1, int(v) + 1) for v in d])
        new = scale_down(x, n, info, d)
        for i in range(numel):  # |x' - x n / d| < 1, in exact integers
            assert abs(int(new[i]) * int(d[i]) - int(x[i]) * int(n[i])) < int(d[i])
        history.append((n, d))
        x = new
    for n, d in reversed(history):
        x = scale_up(x, n, info, d)
    assert torch.equal(x, x0) and not info.limbs


def test_peak_memory_uses_no_private_profiler_fields():
    source = Path(inspect.getfile(sys.modules[peak_memory.__module__])).read_text("utf-8")
    assert "kineto" not in source and "prof.profiler" not in source

    def allocate():
        blocks = [torch.ones(2**16, dtype=torch.float64) for _ in range(3)]  # 3 x 0.5 MiB
        return sum(float(b.sum()) for b in blocks)

    total, peak = peak_memory(allocate)
    assert total == 3 * 2**16 and 1.5 * 2**20 <= peak <= 1.6 * 2**20
