"""The outer optimizers of hyperdiff.tuner.outer_steps: each step against its formula written out
here in plain Python floats, the driver's loss hook, bad input (resume through a checkpoint:
tests/test_resume.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_driver import ridge_problem

import hyperdiff as hd
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan
from hyperdiff.tuner.outer_steps import SignStep, TrustAdam

DT = torch.float64
# gradients with agreeing runs, sign flips and an exact zero, for two coordinates
GRADS = [(0.3, -1.0), (0.5, -2.0), (0.1, 1.0), (-0.2, 0.5), (-0.4, 0.0), (-1.0, 3.0),
         (-0.7, 2.0), (-0.1, 1.0), (-2.0, 1.0), (-0.3, 1.0), (-0.3, 1.0), (-0.3, 1.0)]
LRS = [0.05 * 0.5 * (1 + math.cos(math.pi * t / 15)) + 0.01 for t in range(len(GRADS))]


def sign(x: float) -> float:
    return (x > 0) - (x < 0)


def sign_step_reference(grads, lrs, grow, shrink, low, high):
    """iRprop-minus per coordinate, written out: the raw values after every step."""
    u, scale, prev, out = [0.0, 0.0], [1.0, 1.0], [0.0, 0.0], []
    for g, lr in zip(grads, lrs, strict=True):
        for i in range(2):
            agree = sign(g[i]) * prev[i]
            if agree > 0:
                scale[i] = min(scale[i] * grow, high)
            elif agree < 0:
                scale[i] = max(scale[i] * shrink, low)
            s = 0.0 if agree < 0 else sign(g[i])
            u[i] -= lr * scale[i] * s
            prev[i] = s
        out.append(list(u))
    return out


@pytest.mark.parametrize("grow, shrink, scales", [(1.5, 0.5, (0.01, 10.0)),
                                                  (2.0, 0.3, (0.2, 3.0))])
def test_sign_step_follows_its_formula(grow, shrink, scales):
    """The second setting reaches both ends of the scale range (3 = 1 x 2 x 2 clipped, and 0.2
    after flips), the first grows for 6 agreeing steps of coordinate 0 at the end."""
    u = torch.zeros(2, dtype=DT, requires_grad=True)
    opt = SignStep([u], lr=1.0, grow=grow, shrink=shrink, scales=scales)
    expected = sign_step_reference(GRADS, LRS, grow, shrink, *scales)
    for g, lr, want in zip(GRADS, LRS, expected, strict=True):
        opt.param_groups[0]["lr"] = lr  # the driver sets the scheduled lr every step
        u.grad = torch.tensor(g, dtype=DT)
        opt.step()
        assert u.detach().tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)


def trust_adam_reference(grads, losses, lr, grow, shrink, low, high, b1=0.9, b2=0.999,
                         eps=1e-8):
    """Adam written out, with the step scaled by a radius that follows the losses."""
    u, m, v, radius, last, out = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], 1.0, None, []
    for t, (g, loss) in enumerate(zip(grads, losses, strict=True), start=1):
        if last is not None:
            radius = min(max(radius * (grow if loss < last else shrink), low), high)
        last = loss
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            u[i] -= lr * radius * m_hat / (math.sqrt(v_hat) + eps)
        out.append((list(u), radius))
    return out


def test_trust_adam_follows_its_formula():
    """Falling, rising and equal losses (equal counts as a failure); the radius hits its
    upper bound 2 and its lower bound 0.3."""
    losses = [5.0, 4.0, 3.0, 2.0, 2.0, 2.5, 3.0, 1.0, 0.5, 0.4, 0.6, 0.7]
    u = torch.zeros(2, dtype=DT, requires_grad=True)
    opt = TrustAdam([u], lr=0.1, grow=1.5, shrink=0.5, radii=(0.3, 2.0))
    expected = trust_adam_reference(GRADS, losses, 0.1, 1.5, 0.5, 0.3, 2.0)
    for g, loss, (want, radius) in zip(GRADS, losses, expected, strict=True):
        u.grad = torch.tensor(g, dtype=DT)
        assert opt.step(lambda loss=loss: loss) == loss
        assert u.detach().tolist() == pytest.approx(want, rel=1e-10, abs=1e-14)
        assert opt.param_groups[0]["radius"] == pytest.approx(radius, rel=1e-15)
        assert opt.param_groups[0]["lr"] == 0.1  # the base lr is left as it was
    assert {r for _, r in expected} >= {2.0, 0.3}


def test_trust_adam_without_a_loss_is_adam():
    grads = [torch.tensor(g, dtype=DT) for g in GRADS]
    u, w = (torch.zeros(2, dtype=DT, requires_grad=True) for _ in range(2))
    ours, adam = TrustAdam([u], lr=0.1), torch.optim.Adam([w], lr=0.1)
    for g in grads:
        u.grad, w.grad = g.clone(), g.clone()
        ours.step()
        adam.step()
    assert torch.equal(u, w)
    assert ours.param_groups[0]["radius"] == 1.0


def test_driver_passes_the_selection_loss_to_trust_adam():
    """The radius after a run equals the one the history's selection losses give."""
    problem, selection = ridge_problem(batch_size=6)
    driver = HyperOptimizer(problem, optimizer="trust", selection=selection, lr=0.3,
                            plan=OfflinePlan(explore=0),  # the disagreeing split: no phase
                            stopping=Stopping(max_steps=8, patience=None))
    history = driver.run().history
    losses = [r.selection_loss for r in history]
    radius = 1.0
    for before, after in itertools.pairwise(losses):
        radius = min(max(radius * (1.5 if after < before else 0.5), 0.1), 10.0)
    assert len(set(losses)) == len(losses)
    assert driver.optimizer.param_groups[0]["radius"] == pytest.approx(radius)
    assert driver.optimizer.param_groups[0]["last_loss"] == losses[-1]


@pytest.mark.parametrize("make, message", [
    (lambda u: SignStep([u], lr=0.0), "SignStep: lr must be a positive finite number (got 0.0)"),
    (lambda u: SignStep([u], grow=1.0), "SignStep: grow must be a number in (1, 10) (got 1.0)"),
    (lambda u: SignStep([u], shrink=1), "SignStep: shrink must be a number in (0, 1) (got 1)"),
    (lambda u: SignStep([u], scales=(2.0, 1.0)),
     "SignStep: scales must be a pair (low, high) with 0 < low <= 1 <= high < inf "
     "(got (2.0, 1.0))"),
    (lambda u: TrustAdam([u], lr=math.inf), "TrustAdam: lr must be a positive finite number"),
    (lambda u: TrustAdam([u], grow="2"), "TrustAdam: grow must be a number in (1, 10) (got '2')"),
    (lambda u: TrustAdam([u], radii=(0.0, 10.0)), "TrustAdam: radii must be a pair"),
])
def test_invalid_arguments_are_refused(make, message):
    with pytest.raises(hd.HyperdiffError) as err:
        make(torch.zeros(2, requires_grad=True))
    assert str(err.value).startswith(message)


def test_the_driver_names_every_outer_optimizer():
    problem, _ = ridge_problem()
    with pytest.raises(hd.HyperdiffError, match=r"optimizer must be one of \[.*'signstep'.*"
                                                r"'trust'.*\] \(got 'rprop'\)"):
        HyperOptimizer(problem, optimizer="rprop")


def test_online_runs_refuse_an_offline_only_optimizer_and_auto_gives_them_adam():
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build_online

    online = ["task.name=ridge_diabetes", "outer.mode=online", "inner.steps=20"]
    _, tuner = build_online(load_config(overrides=online))
    assert type(tuner.optimizer) is torch.optim.Adam
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: optimizer must be one of "
                                                r"\[.*'adam'.*\] \(got 'signstep'\)"):
        build_online(load_config(overrides=[*online, "outer.optimizer=signstep"]))


def test_sign_step_on_pure_noise_stays_bounded_and_shrinks():
    """Hypergradients of random sign (no signal): no step exceeds lr x max_scale, and the
    scales drift down (an agreement x1.5 is undone by a flip x0.5, and flips are as likely)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.zeros(1000, dtype=DT, requires_grad=True)
    opt = SignStep([u], lr=0.05)
    largest = 0.0
    for _ in range(200):
        before = u.detach().clone()
        u.grad = torch.randn(1000, generator=gen, dtype=DT)
        opt.step()
        largest = max(largest, float((u.detach() - before).abs().max()))
    assert largest <= 0.05 * 10.0 * (1 + 1e-12)
    assert float(opt.state[u]["scale"].median()) < 0.5
