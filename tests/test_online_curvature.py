"""Online ``method="curvature"``: against RTHO where its curvature model is exact (a loss linear
in theta), against its documented recurrence written out step by step, resume and errors
(float64, tiny problems)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from online_resume import assert_resumes_bit_for_bit
from test_online import mlp_params, predict, val_loss

import hyperdiff as hd
from hyperdiff.engine.training import initial_state, train_step
from hyperdiff.hparams.schedules import FAMILIES
from hyperdiff.methods.curvature import RHO, curvature_segment, initial_tangent

from conftest import sine_data

# the deprecated shim is what these tests exercise (they predate the one loop)
pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

DT = torch.float64


def linear_train_loss(p, h, batch):
    """Linear in theta (zero Hessian): the curvature model with scale 0 is then exact."""
    x, y = batch
    return (x @ p["W1"]).mean() * y.mean() + p["b1"].sum() * 0.1 + p["W2"].sum() * x.mean()


def mlp_train_loss(p, h, batch):
    return val_loss(p, h, batch)


def make(train_loss, steps, momentum=0.7, *, batch_size=6):
    sched = hd.schedule("warmup_cosine", steps)
    hp = hd.HyperParameters(**sched.hyperparameters(peak=0.2, warmup=0.2, final=0.3))
    x, y = sine_data(24, 5, seed=1)
    xv, yv = sine_data(16, 5, seed=2)
    return hd.make_problem(train_loss, val_loss, hp, mlp_params(), optimizer=hd.sgd(sched, momentum),
                           train_data=hd.minibatches(x, y, batch_size=batch_size),
                           val_data=(xv, yv), steps=steps, seed=0, probe=False)


def curvature_and_rtho(prob):
    """The histories of curvature (no forgetting, scale 0) and forward mode (RTHO) over 4
    windows of 3 steps at fixed values (outer lr 0), checked equal window by window."""
    ours = hd.online.OnlineTuner(prob, window=3, method="curvature", lr=0.0, horizon=None,
                          curvature_scale=0.0).run().history
    rtho = hd.online.OnlineTuner(prob, window=3, method="forward", lr=0.0).run().history
    assert len(ours) == len(rtho) == 4
    for a, b in zip(ours, rtho, strict=True):
        for name, g in b.grad.items():
            ga, gb = torch.as_tensor(a.grad[name], dtype=DT), torch.as_tensor(g, dtype=DT)
            assert ((ga - gb).abs() <= 1e-10 * gb.abs().clamp(min=1.0)).all(), (
                name, a.grad, b.grad)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-12)
    return ours, rtho


@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_with_a_zero_hessian_it_equals_rtho_window_by_window(momentum):
    ours, _ = curvature_and_rtho(make(linear_train_loss, 12, momentum))
    assert any(abs(g) > 1e-3 for g in ours[-1].grad.values())  # a non-trivial signal


def reference_start(prob, horizon):
    """What the written-out recurrences (SGD's here, Adam's in test_online_curvature_adam)
    start from: the schedule, the raw names and leaves, the per-step forgetting, the natural
    view, theta_0 and the zero parameter tangents ``(P, *shape)``."""
    sched = prob.optimizer.coefficients["lr"]
    names = list(prob.hparams.raw)
    raw = {n: v.clone().requires_grad_() for n, v in prob.hparams.raw.items()}
    hview = prob.hparams.view({n: v.detach() for n, v in raw.items()})
    state = initial_state(prob, differentiable=False)
    z = {k: torch.zeros(len(names), *p.shape, dtype=DT) for k, p in prob.params.items()}
    return sched, names, raw, 1.0 - 1.0 / horizon, hview, state, z


def lr_and_derivative(prob, sched, raw, names, t):
    """``lr_t`` and its derivative in every raw value (P,), by autograd."""
    lr_t = sched.value(prob.hparams.view(raw), t)
    dlr = torch.stack([g if g is not None else torch.zeros((), dtype=DT) for g in
                       torch.autograd.grad(lr_t, [raw[n] for n in names], allow_unused=True)])
    return lr_t, dlr


def train_gradient_at(prob, params, hview, t):
    """The training gradient at step ``t``'s minibatch, by parameter name."""
    theta = {k: p.detach().requires_grad_() for k, p in params.items()}
    loss = mlp_train_loss(theta, hview, prob.train_data.batch(t, prob.seed))
    return dict(zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True))


def reference(prob, steps, horizon, scale, unit="steps"):
    """The module doc's recurrence written out per step and per parameter tensor: the learning
    rate's derivative by autograd at each step, the momentum and curvature by hand."""
    sched, names, raw, mu_steps, hview, state, z = reference_start(prob, horizon)
    zb = {k: torch.zeros_like(t) for k, t in z.items()}
    v = {k: torch.zeros_like(p) for k, p in prob.params.items()}
    b = {k: torch.zeros_like(p) for k, p in prob.params.items()}
    for t in range(steps):
        lr_t, dlr = lr_and_derivative(prob, sched, raw, names, t)
        grads = train_gradient_at(prob, state.params, hview, t)
        beta = 0.7
        for k in z:
            d = grads[k]
            b[k] = d if t == 0 else beta * b[k] + d
            v[k] = RHO * v[k] + (1 - RHO) * d * d
            curv = torch.minimum(scale * v[k] / (1 - RHO ** (t + 1)),
                                 torch.full_like(d, 2 * (1 + beta) / max(float(lr_t.detach()), 1e-30)))
            zb[k] = beta * zb[k] + curv * z[k]
            mu = mu_steps if unit == "steps" else max(0.0, 1.0 - float(lr_t.detach()) / horizon)
            z[k] = mu * (z[k] - float(lr_t.detach()) * zb[k]) - dlr.reshape(-1, *[1] * d.dim()) * b[k]
        params, buffers, opt_state, _ = train_step(prob, state.params, state.buffers,
                                                   state.opt_state, hview, t,
                                                   differentiable=False)
        state = type(state)(params, buffers, opt_state)
    theta = {k: p.detach().requires_grad_() for k, p in state.params.items()}
    value = val_loss(theta, hview, prob.val_data[0])
    gval = dict(zip(theta, torch.autograd.grad(value, list(theta.values())), strict=True))
    total = sum(z[k].reshape(len(names), -1) @ gval[k].reshape(-1) for k in z)
    return dict(zip(names, total, strict=True)), state


@pytest.mark.parametrize("unit, horizon", [("steps", 7), ("lr", 0.5)])
def test_each_window_is_the_documented_recurrence_step_by_step(unit, horizon):
    steps, window = 10, 5
    prob = make(mlp_train_loss, steps, 0.7)
    tuner = hd.online.OnlineTuner(prob, window=window, method="curvature", lr=0.0, horizon=horizon,
                           horizon_unit=unit)
    records = tuner.run().history
    scale = 6.0  # the training batch's rows
    for j, record in enumerate(records):
        expected, state = reference(prob, (j + 1) * window, horizon, scale, unit)
        for name, g in expected.items():
            assert abs(record.grad[name] - float(g)) <= 1e-10 * max(1.0, abs(float(g))), name
    for k, p in tuner.state.params.items():
        assert torch.allclose(p, state.params[k], rtol=0, atol=1e-14)
    assert tuner.tangent.steps.item() == steps


def test_forgetting_in_optimization_time_is_one_minus_lr_over_the_horizon():
    from hyperdiff.methods.curvature import forgetting

    lr = torch.tensor([0.1, 0.3, 2.0], dtype=DT)
    assert torch.equal(forgetting(0.5, "lr")(lr), torch.tensor([0.8, 0.4, 0.0], dtype=DT))
    assert forgetting(4, "steps")(lr) == 0.75 and forgetting(None, "lr")(lr) == 1.0


def test_a_window_leaves_the_tangent_it_was_given_untouched():
    prob = make(mlp_train_loss, 8)
    raw = prob.hparams.raw
    state = initial_state(prob, differentiable=False)
    first = curvature_segment(prob, state, raw, 0, 4, prob.val_data, None)
    kept = [t.clone() for t in first.carry]
    again = [curvature_segment(prob, first.state, raw, 4, 8, prob.val_data, first.carry)
             for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(kept, first.carry, strict=True))
    assert all(torch.equal(again[0].grad[n], again[1].grad[n]) for n in again[0].grad)
    assert initial_tangent(prob, raw).z.shape == (3, sum(p.numel() for p in prob.params.values()))


def test_resumed_curvature_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
    def tuner():
        return hd.online.OnlineTuner(make(mlp_train_loss, 9), window=2, method="curvature", lr=0.1,
                              optimizer="sgd", normalize=True, val_batch_size=7, seed=3,
                              horizon=20)

    assert_resumes_bit_for_bit(tuner, tmp_path)


def test_schedule_window_equals_its_values_step_by_step():
    for family in FAMILIES:
        sched = hd.schedule(family, 23)
        hp = hd.HyperParameters(**sched.hyperparameters())
        natural = hp.natural()
        expected = torch.stack([sched.value(natural, t) for t in range(3, 17)])
        assert torch.allclose(sched.window(natural, 3, 17), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("optimizer, message", [
    (hd.sgd(0.1, 0.9, dampening=0.5), "heavy-ball SGD"),  # hd.adam: test_online_curvature_adam
    (hd.sgd(0.1, 0.9, nesterov=True), "heavy-ball SGD"),
])
def test_optimizers_it_does_not_describe_are_refused(optimizer, message):
    prob = make(mlp_train_loss, 4)
    with pytest.raises(hd.HyperdiffError, match=message):
        hd.online.OnlineTuner(replace(prob, optimizer=optimizer), method="curvature")


def test_curvature_options_with_another_method_are_refused():
    with pytest.raises(hd.HyperdiffError, match="horizon_unit must be one of"):
        hd.online.OnlineTuner(make(mlp_train_loss, 4), method="curvature", horizon_unit="epochs")
    with pytest.raises(hd.HyperdiffError, match="unless method='curvature'"):
        hd.online.OnlineTuner(make(mlp_train_loss, 4), method="forward", horizon_unit="lr")
    with pytest.raises(hd.HyperdiffError, match="unless method='curvature'"):
        hd.online.OnlineTuner(make(mlp_train_loss, 4), method="reverse", horizon=100)
    with pytest.raises(hd.HyperdiffError, match="horizon"):
        hd.online.OnlineTuner(make(mlp_train_loss, 4), method="curvature", horizon=0)


def test_the_cli_runs_the_curvature_method(tmp_path):
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build_online

    config = load_config(overrides=[
        "task.name=horizon_digits", "inner.steps=40", "outer.mode=online", "outer.window=10",
        "method.name=curvature", "method.horizon=200", "outer.val_batch=0"])
    _, tuner = build_online(config)
    assert tuner.plan.label == "curvature" and tuner.method.options["horizon"] == 200
    record = tuner.step()
    assert record.status == "ok" and abs(record.grad["lr_peak"]) > 0
    _ = predict  # the shared helpers come from test_online


def test_a_task_s_method_options_do_not_follow_another_method():
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build_online

    default = load_config(overrides=["task.name=horizon_digits"])
    assert default.method.name == "curvature" and default.method.options == {
        "horizon": 20.0, "horizon_unit": "lr", "curvature_scale": "auto"}
    other = load_config(overrides=["task.name=horizon_digits", "method.name=reverse",
                                   "outer.backprop=1", "inner.steps=40"])
    assert other.method.options == {}
    _, tuner = build_online(other)
    assert tuner.plan.label == "reverse" and tuner.method.options == {"k": 1}


class HostReads:
    """Counts reads of a tensor's value back to the host (each one a device synchronisation on
    an accelerator): float(t), int(t), bool(t), t.item(), t.tolist()."""

    NAMES = ("__float__", "__int__", "__bool__", "__index__", "item", "tolist")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original):
                self.count += 1
                return _original(tensor, *args)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_window_reads_no_device_value_per_step(monkeypatch, kind):
    """The steps of a window add no host read: K=3 and K=9 read the same number of values
    (momentum and weight decay given as hyperparameters: tensors, not numbers)."""
    steps = 10
    sched = hd.schedule("warmup_cosine", steps)
    hp = hd.HyperParameters(**sched.hyperparameters(peak=0.1, warmup=0.2, final=0.3),
                            mom=hd.scalar(0.6), wd=hd.scalar(1e-3))
    opt = (hd.sgd(sched, "mom", weight_decay="wd") if kind == "sgd"
           else hd.adam(sched, weight_decay="wd"))
    x, y = sine_data(24, 5, seed=1)
    prob = hd.make_problem(mlp_train_loss, val_loss, hp, mlp_params(), optimizer=opt,
                           train_data=hd.minibatches(x, y, batch_size=6),
                           val_data=sine_data(16, 5, seed=2), steps=steps, seed=0, probe=False)
    raw = prob.raw_tensors(hp.raw)
    state = initial_state(prob, differentiable=False)
    reads = []
    for window in (3, 9):
        counter = HostReads(monkeypatch)
        out = curvature_segment(prob, state, raw, 0, window, prob.val_data, None)
        reads.append(counter.count)
        monkeypatch.undo()
        assert int(out.carry.steps) == window
    assert reads[0] == reads[1], reads
