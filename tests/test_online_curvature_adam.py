"""Online ``method="curvature"`` with Adam and AdamW: against RTHO where the curvature model is
exact (a train loss linear in theta, the coupled weight decay carried exactly), against the
documented recurrence written out step by step per tensor, resume and errors (float64, tiny
problems)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from online_resume import assert_resumes_bit_for_bit
from test_online import mlp_params, val_loss
from test_online_curvature import (
    curvature_and_rtho,
    linear_train_loss,
    lr_and_derivative,
    mlp_train_loss,
    reference_start,
    train_gradient_at,
)

import hyperdiff as hd
from hyperdiff.engine.training import initial_state, train_step
from hyperdiff.methods.curvature import RHO, curvature_segment, initial_tangent
from hyperdiff.methods.curvature_adam import AdamCurvatureTangent

from conftest import sine_data

# the deprecated shim is what these tests exercise (they predate the one loop)
pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

DT = torch.float64
BETAS = (0.8, 0.95)


def linear_loss_without_b1(p, h, batch):
    """Linear in theta and blind to ``b1``: Adam's second moment of ``b1`` stays exactly 0."""
    x, y = batch
    return (x @ p["W1"]).mean() * y.mean() + p["W2"].sum() * x.mean()


def optimizer(kind, sched, wd):
    if kind == "adamw":
        return hd.adamw(sched, BETAS, 1e-6, weight_decay=wd)
    return hd.adam(sched, BETAS, 1e-6, weight_decay=wd)


def make(train_loss, steps, kind="adam", wd=0.0, *, peak=0.05, batch_size=6):
    sched = hd.schedule("warmup_cosine", steps)
    hp = hd.HyperParameters(**sched.hyperparameters(peak=peak, warmup=0.2, final=0.3))
    x, y = sine_data(24, 5, seed=1)
    xv, yv = sine_data(16, 5, seed=2)
    return hd.make_problem(train_loss, val_loss, hp, mlp_params(),
                           optimizer=optimizer(kind, sched, wd),
                           train_data=hd.minibatches(x, y, batch_size=batch_size),
                           val_data=(xv, yv), steps=steps, seed=0, probe=False)


@pytest.mark.parametrize("kind, wd, loss", [("adam", 0.0, linear_train_loss),
                                            ("adam", 0.3, linear_train_loss),
                                            ("adamw", 0.3, linear_train_loss),
                                            ("adam", 0.0, linear_loss_without_b1)])
def test_with_a_zero_hessian_it_equals_rtho_window_by_window(kind, wd, loss):
    prob = make(loss, 12, kind, wd)
    tuner = hd.online.OnlineTuner(prob, window=3, method="curvature", lr=0.0, horizon=None,
                           curvature_scale=0.0)
    ours = tuner.run().history
    rtho = hd.online.OnlineTuner(prob, window=3, method="forward", lr=0.0).run().history
    assert len(ours) == len(rtho) == 4
    if loss is linear_loss_without_b1:  # safe_sqrt's case: v = 0, its derivative 0
        assert not tuner.state.opt_state.exp_avg_sq["b1"].any()
    assert torch.isfinite(tuner.tangent.z).all()
    for a, b in zip(ours, rtho, strict=True):
        for name, g in b.grad.items():
            assert abs(a.grad[name] - g) <= 1e-10 * max(1.0, abs(g)), (name, a.grad, b.grad)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-12)
    assert abs(ours[-1].grad["lr_peak"]) > 1e-3  # a non-trivial signal


def reference(prob, steps, horizon, scale, kind, wd, unit="steps"):
    """The recurrence of ``online/curvature_adam.py`` written out per step and per parameter
    tensor: the learning rate's derivative by autograd, Adam's moments and the tangents by
    hand (the last step's direct term included: the schedule's values act only through the
    learning rate). Returns the hypergradient, the final state and how many entries were
    capped."""
    b1, b2, eps = BETAS[0], BETAS[1], 1e-6
    sched, names, raw, mu_steps, hview, state, z = reference_start(prob, horizon)
    zm = {k: torch.zeros_like(t) for k, t in z.items()}
    zv = {k: torch.zeros_like(t) for k, t in z.items()}
    est = {k: torch.zeros_like(p) for k, p in prob.params.items()}
    m = {k: torch.zeros_like(p) for k, p in prob.params.items()}
    v = {k: torch.zeros_like(p) for k, p in prob.params.items()}
    capped = 0
    for t in range(steps):
        lr_t, dlr = lr_and_derivative(prob, sched, raw, names, t)
        lr = float(lr_t.detach())
        grads = train_gradient_at(prob, state.params, hview, t)
        k_t = t + 1
        c1, c2 = 1 - b1 ** k_t, 1 - b2 ** k_t
        for k in z:
            g, p = grads[k], state.params[k]
            s = g if kind == "adamw" else g + wd * p
            m[k] = b1 * m[k] + (1 - b1) * s
            v[k] = b2 * v[k] + (1 - b2) * s * s
            q = v[k].sqrt() / c2 ** 0.5 + eps
            r = m[k] / q
            est[k] = RHO * est[k] + (1 - RHO) * g * g
            cap = 2 * (1 + b1) / (1 - b1) * q * c1 / lr
            curv = torch.minimum(scale * est[k] / (1 - RHO ** (t + 1)), cap)
            capped += int((scale * est[k] / (1 - RHO ** (t + 1)) > cap).sum())
            ds = (curv if kind == "adamw" else curv + wd) * z[k]
            zm[k] = b1 * zm[k] + (1 - b1) * ds
            zv[k] = b2 * zv[k] + (1 - b2) * 2 * s * ds
            dq = zv[k] / (2 * v[k].sqrt() * c2 ** 0.5)
            dr = (zm[k] - r * dq) / q
            decay = 1 - lr * wd if kind == "adamw" else 1.0
            shape = (-1, *[1] * g.dim())
            direct = r / c1 + (wd * p if kind == "adamw" else 0.0)
            mu = mu_steps if unit == "steps" else max(0.0, 1.0 - float(lr) / horizon)
            z[k] = mu * (decay * z[k] - lr / c1 * dr) - dlr.reshape(shape) * direct
            zm[k], zv[k] = mu * zm[k], mu * zv[k]
        params, buffers, opt_state, _ = train_step(prob, state.params, state.buffers,
                                                   state.opt_state, hview, t,
                                                   differentiable=False)
        state = type(state)(params, buffers, opt_state)
        for k in m:  # the hand-written moments are Adam's
            assert torch.allclose(m[k], opt_state.exp_avg[k], rtol=1e-12, atol=1e-15)
            assert torch.allclose(v[k], opt_state.exp_avg_sq[k], rtol=1e-12, atol=1e-18)
    theta = {k: p.detach().requires_grad_() for k, p in state.params.items()}
    value = val_loss(theta, hview, prob.val_data[0])
    gval = dict(zip(theta, torch.autograd.grad(value, list(theta.values())), strict=True))
    total = sum(z[k].reshape(len(names), -1) @ gval[k].reshape(-1) for k in z)
    return dict(zip(names, total, strict=True)), state, capped


@pytest.mark.parametrize("kind, wd, scale, unit", [
    ("adam", 0.2, None, "steps"), ("adamw", 0.2, None, "steps"), ("adam", 0.0, 2000.0, "steps"),
    ("adamw", 0.2, None, "lr")])
def test_each_window_is_the_documented_recurrence_step_by_step(kind, wd, scale, unit):
    steps, window = 10, 5
    horizon = 7 if unit == "steps" else 0.25
    prob = make(mlp_train_loss, steps, kind, wd, peak=0.1)
    tuner = hd.online.OnlineTuner(prob, window=window, method="curvature", lr=0.0, horizon=horizon,
                           horizon_unit=unit, curvature_scale=scale)
    records = tuner.run().history
    capped_somewhere = scale is not None
    scale = scale or 6.0  # default: the training batch's rows
    for j, record in enumerate(records):
        stop = (j + 1) * window
        expected_grad, state, capped = reference(prob, stop, horizon, scale, kind, wd, unit)
        for name, g in expected_grad.items():
            expected = float(g)
            assert abs(record.grad[name] - expected) <= 1e-10 * max(1.0, abs(expected)), name
        if capped_somewhere:  # a large curvature: the stability cap is active
            assert capped > 0
    for k, p in tuner.state.params.items():
        assert torch.allclose(p, state.params[k], rtol=0, atol=1e-14)
    assert isinstance(tuner.tangent, AdamCurvatureTangent)
    assert tuner.tangent.steps.item() == steps


def test_a_window_leaves_the_tangent_it_was_given_untouched():
    prob = make(mlp_train_loss, 8, "adamw", 0.1)
    raw = prob.hparams.raw
    state = initial_state(prob, differentiable=False)
    first = curvature_segment(prob, state, raw, 0, 4, prob.val_data, None)
    assert isinstance(first.carry, AdamCurvatureTangent)
    kept = [t.clone() for t in first.carry]
    again = [curvature_segment(prob, first.state, raw, 4, 8, prob.val_data, first.carry)
             for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(kept, first.carry, strict=True))
    assert all(torch.equal(again[0].grad[n], again[1].grad[n]) for n in again[0].grad)
    like = initial_tangent(prob, raw)
    assert isinstance(like, AdamCurvatureTangent)
    assert like.zv.shape == (3, sum(p.numel() for p in prob.params.values()))


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_resumed_curvature_run_equals_uninterrupted_run_bit_for_bit(tmp_path, kind):
    def tuner():
        return hd.online.OnlineTuner(make(mlp_train_loss, 9, kind, 0.1), window=2, method="curvature",
                              lr=0.1, optimizer="sgd", normalize=True, val_batch_size=7, seed=3,
                              horizon=20)

    second, whole = assert_resumes_bit_for_bit(tuner, tmp_path)
    assert isinstance(second.tangent, AdamCurvatureTangent)
    assert len({r.hparams["lr_peak"] for r in whole.history}) > 1  # the outer steps moved it


@pytest.mark.parametrize("optimizer", [
    hd.sgd(0.1, 0.9, nesterov=True),
    hd.sgd(0.1, 0.9, dampening=0.5),
    hd.sgd(0.1, 0.9)._replace(name="lion"),
])
def test_optimizers_it_does_not_describe_are_refused(optimizer):
    prob = make(mlp_train_loss, 4)
    with pytest.raises(hd.HyperdiffError, match=r"heavy-ball SGD .*hd.adam and hd.adamw; got "
                       + optimizer.name):
        hd.online.OnlineTuner(replace(prob, optimizer=optimizer), method="curvature")


# --- issue 20 item 3: AdamW's decoupled weight decay carried like the learning rate ---

def make_tuned_decay(train_loss, steps, wd_kind="scalar"):
    """AdamW with a warmup-cosine lr and a weight-decay hyperparameter ``wd`` (float64)."""
    sched = hd.schedule("warmup_cosine", steps)
    hp = hd.HyperParameters(**sched.hyperparameters(peak=0.05, warmup=0.2, final=0.3),
                            wd=hd.scalar(0.3) if wd_kind == "scalar" else
                            hd.per_tensor(mlp_params(), {"W1": 0.3, "b1": 0.1, "W2": 0.5}))
    x, y = sine_data(24, 5, seed=1)
    xv, yv = sine_data(16, 5, seed=2)
    return hd.make_problem(train_loss, val_loss, hp, mlp_params(),
                           optimizer=hd.adamw(sched, BETAS, 1e-6, weight_decay="wd"),
                           train_data=hd.minibatches(x, y, batch_size=6),
                           val_data=(xv, yv), steps=steps, seed=0, probe=False)


@pytest.mark.parametrize("wd_kind", ["scalar", "per_tensor"])
def test_a_tuned_adamw_weight_decay_gets_the_rtho_hypergradient_over_many_windows(wd_kind):
    """With a zero Hessian the carried recurrence is exact: the weight decay's hypergradient
    equals forward mode's (RTHO) in every window, not only its last step's effect."""
    _, rtho = curvature_and_rtho(make_tuned_decay(linear_train_loss, 12, wd_kind))
    last = torch.as_tensor(rtho[-1].grad["wd"], dtype=DT)
    assert last.abs().max() > 1e-4  # a non-trivial signal


def test_the_carried_weight_decay_tangent_matches_central_differences():
    """One window of 8 steps of an MLP in float64 from theta_0, without forgetting: the weight
    decay's carried hypergradient against central finite differences of the validation loss
    after the window (in wd's raw value); the curvature model is approximate there, so the
    check is loose, but it must see the steps before the last (the one-step signal alone is
    checked to be far off)."""
    prob = make_tuned_decay(mlp_train_loss, 8)
    raw = {k: v.detach().clone() for k, v in prob.raw_tensors().items()}
    start = initial_state(prob, differentiable=False)
    out = curvature_segment(prob, start, raw, 0, 8, [prob.val_data[0]], None, horizon=None)
    one_step = curvature_segment(prob, start, raw, 0, 8, [prob.val_data[0]], None, horizon=1)

    def loss_at(u):
        shifted = {**raw, "wd": raw["wd"] + u}
        view = prob.hparams.view(prob.raw_tensors(shifted))
        state = start
        for t in range(8):
            params, buffers, opt_state, _ = train_step(prob, *state, view, t, differentiable=False)
            state = type(state)(params, buffers, opt_state)
        return float(val_loss(state.params, view, prob.val_data[0]))

    h = 1e-4
    reference = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert abs(reference) > 1e-5
    carried, greedy = float(out.grad["wd"]), float(one_step.grad["wd"])
    assert carried == pytest.approx(reference, rel=0.25)
    assert abs(carried - reference) < 0.5 * abs(greedy - reference)
