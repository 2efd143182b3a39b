"""Exact savings in the online window, round 2 (issue 20 item 3, s30): a coefficient that every
parameter tensor reads as the same one-entry value (a scalar or per_step weight decay, beta or
eps) enters the tangent rule as a (1,) tensor instead of an (n,) copy built at every step, and
a scalar learning rate's derivatives come from a backward pass that starts at its own raw
value instead of at the flat vector of all raw values. Each is checked bit for bit against
the computation it replaces, written out here; whole suite runs are compared with the code
before by ``benchmarks/online_bitwise.py``."""

from __future__ import annotations

import sys

import pytest
import torch

import hyperdiff as hd
from hyperdiff.engine.optimizers import resolve
from hyperdiff.engine.training import flat, initial_state, train_gradient
from hyperdiff.methods import curvature_rule
from hyperdiff.methods.curvature import curvature_segment, lr_derivatives

from conftest import sine_data


def params(dtype):
    g = torch.Generator().manual_seed(0)
    return {"W1": (torch.randn(5, 4, generator=g) * 0.5).to(dtype),
            "b1": torch.zeros(4, dtype=dtype),
            "W2": (torch.randn(4, 1, generator=g) * 0.5).to(dtype)}


def loss(p, h, batch):
    x, y = batch
    pred = torch.tanh(x.to(p["W1"].dtype) @ p["W1"] + p["b1"]) @ p["W2"]
    return ((pred - y.to(pred.dtype)) ** 2).mean()


def make(hp, optimizer, dtype, steps=12):
    x, y = sine_data(24, 5, seed=1)
    xv, yv = sine_data(16, 5, seed=2)
    return hd.make_problem(loss, loss, hp, params(dtype), optimizer=optimizer,
                           train_data=hd.minibatches(x, y, batch_size=6), val_data=(xv, yv),
                           steps=steps, seed=0, probe=False)


def expanded(coef, hview, step, params, like):
    """The rule's coefficient as before this change: a number as a float, anything else as
    an (n,) vector, each parameter tensor's value expanded over its entries."""
    if isinstance(coef, (int, float)):
        return float(coef)
    return torch.cat([torch.as_tensor(resolve(coef, hview, step, k), dtype=like.dtype,
                                      device=like.device).detach().expand(p.shape).reshape(-1)
                      for k, p in params.items()])


def window(prob, raw):
    """Two windows carrying the tangents (the second from the first's carry): the carried
    tangent and the hypergradient of each."""
    state = initial_state(prob, prob.hparams.view(raw), differentiable=False)
    first = curvature_segment(prob, state, raw, 0, 5, prob.val_data, horizon=40, scale=6.0)
    second = curvature_segment(prob, first.state, raw, 5, 11, prob.val_data, first.carry,
                               horizon=40, scale=6.0)
    return [(list(s.carry), s.grad, s.state.params) for s in (first, second)]


CASES = {
    "adamw, scalar wd": (lambda: hd.HyperParameters(lr=hd.scalar(0.02), wd=hd.scalar(0.05)),
                         lambda: hd.adamw("lr", weight_decay="wd")),
    "adam, coupled scalar wd and beta1": (
        lambda: hd.HyperParameters(lr=hd.scalar(0.02), wd=hd.scalar(0.05),
                                   b1=hd.scalar(0.8, (0.0, 1.0))),
        lambda: hd.adam("lr", betas=("b1", 0.99), weight_decay="wd")),
    "adamw, per_step wd": (lambda: hd.HyperParameters(lr=hd.scalar(0.02),
                                                      wd=hd.per_step(12, 0.05)),
                           lambda: hd.adamw("lr", weight_decay="wd")),
    "sgd, coupled scalar wd": (lambda: hd.HyperParameters(lr=hd.scalar(0.1),
                                                          wd=hd.scalar(0.05)),
                               lambda: hd.sgd("lr", 0.9, weight_decay="wd")),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_a_shared_coefficient_as_one_entry_gives_the_expanded_vector_s_bits(
        case, dtype, monkeypatch):
    hp_fn, opt_fn = CASES[case]
    prob = make(hp_fn(), opt_fn(), dtype)
    raw = {n: v * 1.1 + 0.05 for n, v in prob.hparams.raw.items()}
    ours = window(prob, raw)
    for module in ("curvature_rule", "curvature", "curvature_adam"):
        monkeypatch.setattr(sys.modules[f"hyperdiff.methods.{module}"], "per_entry", expanded)
    reference = window(prob, raw)
    for (tangent, grad, theta), (ref_tangent, ref_grad, ref_theta) in zip(
            ours, reference, strict=True):
        for mine, theirs in zip(tangent, ref_tangent, strict=True):
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
        assert all(torch.equal(grad[n], ref_grad[n]) for n in ref_grad)
        assert all(torch.equal(theta[k], ref_theta[k]) for k in ref_theta)
    assert any(bool(t.abs().sum() > 0) for t in reference[1][0][:-2])  # tangents that moved


def test_per_entry_keeps_one_entry_only_where_every_tensor_reads_the_same_value():
    hp = hd.HyperParameters(a=hd.scalar(0.5), s=hd.per_step(4, 0.25),
                            t=hd.per_tensor(params(torch.float32), {"W1": 0.1, "b1": 0.2, "W2": 0.3}))
    prob = make(hp, hd.sgd(0.1), torch.float32)
    hview = hp.view(hp.raw)
    like = torch.zeros(3, dtype=torch.float32)
    assert curvature_rule.per_entry(0.3, hview, 2, prob.params, like) == 0.3
    for name in ("a", "s"):
        value = curvature_rule.per_entry(name, hview, 2, prob.params, like)
        assert value.shape == (1,) and value.dtype == torch.float32
        assert torch.equal(value.expand(28), expanded(name, hview, 2, prob.params, like))
    per_tensor = curvature_rule.per_entry("t", hview, 2, prob.params, like)
    assert per_tensor.shape == (28,)
    assert torch.equal(per_tensor, expanded("t", hview, 2, prob.params, like))


def flat_pass(prob, raw, start, stop):
    """A scalar learning rate's rows and derivatives as before this change: one backward
    pass from the flat vector of all raw values (split into the hyperparameters), repeated
    over the window's rows: ``(K, 1)``, ``(K, P, 1)``."""
    hp = prob.hparams
    flat = hp.flatten(prob.raw_tensors(raw)).detach().requires_grad_()
    value = hp.view(hp.unflatten(flat))["lr"].reshape(())
    (jac,) = torch.autograd.grad(value, flat)
    steps = stop - start
    return (value.detach().reshape(1, 1).repeat(steps, 1),
            jac.reshape(1, -1, 1).repeat(steps, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("constraint", ["log", "positive", (1e-3, 2.0)])
def test_a_scalar_learning_rate_s_derivatives_from_its_own_raw_value_bit_for_bit(
        constraint, dtype):
    # the learning rate after a vector of penalties: its entry is not the flat vector's first
    hp = hd.HyperParameters(l2=hd.per_tensor(params(dtype), 0.01),
                            lr=hd.scalar(0.3, constraint), mom=hd.scalar(0.6, (0.0, 1.0)))
    prob = make(hp, hd.sgd("lr", "mom"), dtype)
    raw = {n: (v * 1.37 - 0.2) for n, v in hp.raw.items()}
    ours = lr_derivatives(prob, raw, 7, 12)
    reference = flat_pass(prob, raw, 7, 12)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        assert torch.equal(mine, theirs)
    assert int((ours[1][0, :, 0] != 0).sum()) == 1 and float(ours[1][0, 3, 0]) != 0.0


def penalized(p, h, batch):
    return loss(p, h, batch) + h["wd"] * sum((v ** 2).sum() for v in p.values())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_tangent_with_no_rows_moves_only_the_squared_gradient_average(optimizer):
    """A constant learning rate and a loss hyperparameter: no carried row. The window's steps
    update only the curvature estimate's average, checked against a hand-written unroll of
    ``v <- RHO v + (1 - RHO) d^2`` (``d`` the gradient, plus SGD's coupled decay)."""
    hp = hd.HyperParameters(wd=hd.scalar(0.05))
    opt = (hd.sgd(0.1, 0.9, weight_decay=0.01) if optimizer == "sgd"
           else hd.adamw(0.02, weight_decay=0.01))
    x, y = sine_data(24, 5, seed=1)
    prob = hd.make_problem(penalized, loss, hp, params(torch.float32), optimizer=opt,
                           train_data=hd.minibatches(x, y, batch_size=6),
                           val_data=sine_data(16, 5, seed=2), steps=10, seed=0, probe=False)
    raw = prob.hparams.raw
    hview = prob.hparams.view(prob.raw_tensors(raw))
    state = initial_state(prob, hview, differentiable=False)
    first = curvature_segment(prob, state, raw, 0, 6, prob.val_data)
    second = curvature_segment(prob, first.state, raw, 6, 10, prob.val_data, first.carry)
    assert first.carry.z.shape[0] == 0 and int(second.carry.steps) == 10

    theta, opt_state = dict(state.params), state.opt_state
    v = torch.zeros(28, dtype=torch.float32)
    for step in range(10):
        last = step in (5, 9)  # a window's last step: with a graph, as the method takes it
        hleaves = prob.hparams.view({n: t.detach().requires_grad_() for n, t in
                                     raw.items()}) if last else hview
        leaves = {k: t.detach().requires_grad_() for k, t in theta.items()}
        grads, _, _ = train_gradient(prob, leaves, {}, hleaves, step, create_graph=last)
        d = torch.cat([g.detach().reshape(-1) for g in grads.values()])
        if optimizer == "sgd":
            d = d + torch.full((1,), 0.01) * torch.cat([t.reshape(-1) for t in theta.values()])
        v.mul_(curvature_rule.RHO).addcmul_(d, d, value=1.0 - curvature_rule.RHO)
        with torch.set_grad_enabled(last):
            theta, opt_state = prob.optimizer.update(grads, opt_state,
                                                     leaves if last else theta, hleaves, step)
        theta = {k: t.detach() for k, t in theta.items()}
        opt_state = type(opt_state)(*({k: t.detach() for k, t in field.items()}
                                      if isinstance(field, dict) else field
                                      for field in opt_state))
        if step == 5:
            assert torch.equal(first.carry.v, v)
    assert torch.equal(second.carry.v, v)
    assert all(torch.equal(second.state.params[k], theta[k]) for k in theta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_constant_learning_rate_s_rows_and_zero_derivatives_as_the_stacked_rows(dtype):
    """A number as the learning rate: its rows and zero derivatives as the general path
    stacked them (one 0-d tensor per step, no backward pass)."""
    prob = make(hd.HyperParameters(wd=hd.scalar(0.05), l2=hd.per_tensor(params(dtype), 0.01)),
                hd.sgd(0.3, 0.9, weight_decay="wd"), dtype)
    lrs, dlrs = lr_derivatives(prob, prob.hparams.raw, 2, 9)
    stacked = torch.stack([torch.as_tensor(0.3, dtype=prob.hparam_dtype)
                           for _ in range(2, 9)])[:, None]
    assert lrs.dtype == stacked.dtype and torch.equal(lrs, stacked)
    assert dlrs.shape == (7, 4, 1) and dlrs.dtype == stacked.dtype
    assert not bool(dlrs.any())


def test_flat_passes_one_dimensional_tensors_without_a_reshape_and_copies():
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g), torch.tensor(0.5),
               torch.randn(1, generator=g)]
    out = flat(tensors)
    assert torch.equal(out, torch.cat([t.reshape(-1) for t in tensors]))
    alone = flat([tensors[1]])
    assert torch.equal(alone, tensors[1])
    alone[0] = 7.0  # a new tensor, never a view of the one given
    assert float(tensors[1][0]) != 7.0
