"""Offline ``curvature`` (issue 20 item 4): the segment ``[0, T)`` from theta_0 with no
forgetting, against exact reverse mode where the curvature model is exact (a train loss linear
in theta; a quadratic whose Hessian is the model's capped value), against float64 central
differences of the whole training for SGD's coupled weight decay, against the online segment,
and its refusals (float64, tiny problems)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_online import mlp_params, val_loss
from test_online_curvature import linear_train_loss

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.plans import configured_method
from hyperdiff.engine.training import initial_state, train_step
from hyperdiff.methods.curvature import curvature_segment

from conftest import sine_data

DT = torch.float64
BETAS = (0.8, 0.95)


def decay_hparam(kind):
    """A weight-decay hyperparameter ``wd``: one scalar, or one value per parameter tensor."""
    if kind == "scalar":
        return hd.scalar(0.3)
    return hd.per_tensor(mlp_params(), {"W1": 0.3, "b1": 0.1, "W2": 0.5})


def optimizer_for(kind, sched, wd):
    """``kind``: ``sgd0`` (plain SGD), ``sgd`` (heavy ball, momentum 0.7), ``adam`` (coupled
    decay), ``adamw`` (decoupled decay); ``wd`` a number or a hyperparameter's name."""
    if kind.startswith("sgd"):
        return hd.sgd(sched, 0.0 if kind == "sgd0" else 0.7, weight_decay=wd)
    make = hd.adamw if kind == "adamw" else hd.adam
    return make(sched, BETAS, 1e-6, weight_decay=wd)


def make(train_loss, steps, kind, wd_kind=None, *, wd=0.0):
    """An MLP problem with a warmup-cosine learning rate (3 raw values) and, with ``wd_kind``,
    a weight-decay hyperparameter ``wd`` (else the fixed decay ``wd``)."""
    sched = hd.schedule("warmup_cosine", steps)
    values = sched.hyperparameters(peak=0.05 if kind.startswith("adam") else 0.2,
                                   warmup=0.2, final=0.3)
    if wd_kind is not None:
        values["wd"] = decay_hparam(wd_kind)
    x, y = sine_data(24, 5, seed=1)
    xv, yv = sine_data(16, 5, seed=2)
    return hd.make_problem(train_loss, val_loss, hd.HyperParameters(**values), mlp_params(),
                           optimizer=optimizer_for(kind, sched, "wd" if wd_kind else wd),
                           train_data=hd.minibatches(x, y, batch_size=6),
                           val_data=(xv, yv), steps=steps, seed=0, probe=False)


def assert_close(got, want, rel):
    for name, g in want.items():
        a, b = torch.as_tensor(got[name], dtype=DT), torch.as_tensor(g, dtype=DT)
        assert ((a - b).abs() <= rel * b.abs().clamp(min=1.0)).all(), (name, a, b)


# --- (a) a zero Hessian, scale 0, no forgetting: the recurrence is exact --------------------
EXACT_ROWS = [("sgd0", "scalar", 0.0), ("sgd", "scalar", 0.0), ("sgd", "per_tensor", 0.0),
              ("sgd", None, 0.1), ("adam", None, 0.3), ("adamw", "scalar", 0.0),
              ("adamw", "per_tensor", 0.0)]


@pytest.mark.parametrize("kind, wd_kind, wd", EXACT_ROWS,
                         ids=[f"{k}-{w or f'wd={d}'}" for k, w, d in EXACT_ROWS])
def test_with_a_zero_hessian_the_offline_call_is_reverse_mode(kind, wd_kind, wd):
    """Reverse mode through all T steps is the independent reference: with a train loss
    linear in theta and ``curvature_scale=0`` the tangents are forward mode's, exactly."""
    prob = make(linear_train_loss, 10, kind, wd_kind, wd=wd)
    ours = hd.methods.curvature(horizon=None, curvature_scale=0.0)(prob)
    exact = hd.reverse()(prob)
    assert ours.value == pytest.approx(exact.value, rel=1e-13)
    assert_close(ours.grad, exact.grad, 1e-12)
    assert ours.method == "curvature" and ours.train_loss == pytest.approx(exact.train_loss,
                                                                           rel=1e-13)
    for name, g in exact.grad.items():  # every raw value gets a non-trivial signal
        assert g.abs().max() > 1e-4, name
    one_step = hd.methods.curvature(horizon=1, curvature_scale=0.0)(prob)  # forgets at once
    assert (one_step.vector - exact.vector).abs().max() > 1e-3


def test_offline_forgets_nothing_unless_a_horizon_is_given():
    """``horizon="auto"`` (the default) keeps the whole run offline; an explicit horizon
    applies offline too."""
    prob = make(linear_train_loss, 10, "sgd", "scalar")
    auto = hd.methods.curvature(curvature_scale=0.0)(prob)
    kept = hd.methods.curvature(horizon=None, curvature_scale=0.0)(prob)
    forgetting = hd.methods.curvature(horizon=3, curvature_scale=0.0)(prob)
    assert torch.equal(auto.vector, kept.vector)
    assert not torch.allclose(forgetting.vector, kept.vector, rtol=1e-3)
    assert auto.diagnostics["horizon"] is None and forgetting.diagnostics["horizon"] == 3


# --- (b) a Hessian that the model gives exactly ---------------------------------------------
LR, BETA, STEPS = 0.1, 0.5, 12
EDGE = 2 * (1 + BETA) / LR
"""The heavy-ball stability limit that caps the model: ``D_t = min(scale vhat_t, EDGE)``."""


def edge_quadratic(p, h, batch):
    """``EDGE / 2 ||theta||^2 + <x_batch, theta>``: Hessian ``EDGE I`` (with the coupled
    decay ``wd``: ``(EDGE + wd) I``, as the model's ``D_t + wd``)."""
    x, _ = batch
    theta = torch.cat([v.reshape(-1) for v in p.values()])
    drive = torch.cat([x.mean(0), x.std(0)[:4], x.mean(0)[:4]])
    return 0.5 * EDGE * (theta ** 2).sum() + (drive[: theta.numel()] * theta).sum()


def edge_problem(with_decay):
    values = {"lr": hd.scalar(LR)}
    if with_decay:
        values["wd"] = hd.scalar(0.05)
    x, y = sine_data(24, 5, seed=1)
    xv, yv = sine_data(16, 5, seed=2)
    params = {"w": torch.linspace(-0.5, 0.5, 5, dtype=DT), "b": torch.tensor([0.3, -0.2], dtype=DT)}

    def val(p, h, batch):
        xb, yb = batch
        return ((xb @ p["w"] + p["b"].sum() - yb[:, 0]) ** 2).mean()

    return hd.make_problem(edge_quadratic, val, hd.HyperParameters(**values), params,
                           optimizer=hd.sgd("lr", BETA,
                                            weight_decay="wd" if with_decay else 0.0),
                           train_data=hd.minibatches(x, y, batch_size=6), val_data=(xv, yv),
                           steps=STEPS, seed=0, probe=False)


@pytest.mark.parametrize("with_decay", [False, True], ids=["lr", "lr+wd"])
def test_where_the_capped_model_is_the_hessian_the_offline_call_is_reverse_mode(with_decay):
    """A quadratic whose Hessian is ``EDGE I`` trained at ``lr = 2 (1 + beta) / EDGE``: with a
    huge ``curvature_scale`` the model's cap binds, ``D_t = EDGE`` exactly, so the offline
    call equals reverse mode with a nonzero Hessian (momentum and curvature terms both live;
    the trajectory oscillates on the stability edge, a root -1, and stays bounded)."""
    prob = edge_problem(with_decay)
    ours = hd.methods.curvature(horizon=None, curvature_scale=1e30)(prob)
    exact = hd.reverse()(prob)
    assert_close(ours.grad, exact.grad, 1e-10)
    assert abs(float(exact.grad["lr"])) > 1e-2
    flat = hd.methods.curvature(horizon=None, curvature_scale=0.0)(prob)  # no Hessian term
    assert abs(float(flat.grad["lr"] - exact.grad["lr"])) > 1e-2 * abs(float(exact.grad["lr"]))


# --- (c) SGD's coupled weight decay, against central differences ----------------------------
def central_difference(prob, name, h=1e-5):
    """``dL_val/du`` of raw value ``name`` by float64 central differences of the whole
    training (plain steps, no graph)."""
    raw = {k: v.detach().clone() for k, v in prob.raw_tensors().items()}

    def loss_at(shift):
        view = prob.hparams.view(prob.raw_tensors({**raw, name: raw[name] + shift}))
        state = initial_state(prob, view, differentiable=False)
        for t in range(prob.steps):
            params, buffers, opt_state, _ = train_step(prob, *state, view, t,
                                                       differentiable=False)
            state = type(state)(params, buffers, opt_state)
        return float(val_loss(state.params, view, prob.val_data[0]))

    return (loss_at(h) - loss_at(-h)) / (2 * h)


@pytest.mark.parametrize("momentum", ["sgd0", "sgd"])
def test_sgds_coupled_weight_decay_is_carried_through_the_whole_run(momentum):
    """The segment ``[0, T)`` (online) and the offline call: the decay's hypergradient against
    central differences on a linear loss (where the carried recurrence is exact). Before the
    decay was carried, it had its last step's effect only (off by more than 10%)."""
    prob = make(linear_train_loss, 10, momentum, "scalar")
    reference = central_difference(prob, "wd")
    assert abs(reference) > 1e-3
    state = initial_state(prob, differentiable=False)
    raw = prob.raw_tensors()
    segment = curvature_segment(prob, state, raw, 0, prob.steps, prob.val_data, None,
                                horizon=None, scale=0.0)
    assert float(segment.grad["wd"]) == pytest.approx(reference, rel=1e-7)
    offline = hd.methods.curvature(curvature_scale=0.0)(prob)
    assert float(offline.grad["wd"]) == pytest.approx(reference, rel=1e-7)


# --- (d) the offline call is the online segment [0, T) with the same options ----------------
@pytest.mark.parametrize("options", [{"horizon": None}, {"horizon": 4},
                                     {"horizon": 0.5, "horizon_unit": "lr"},
                                     {"horizon": None, "curvature_scale": 50.0}],
                         ids=["keep", "steps", "lr", "scale"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_offline_call_is_the_segment_from_theta_0_with_the_same_options(kind, options):
    from test_online_curvature import mlp_train_loss

    prob = make(mlp_train_loss, 8, kind, "scalar")
    method = hd.methods.curvature(**options)
    with torch.no_grad():
        state = initial_state(prob, differentiable=False)
    segment = method.segment(prob, state, prob.raw_tensors(), 0, prob.steps, prob.val_data)
    offline = method(prob)
    assert offline.value == segment.value
    assert torch.equal(offline.vector, prob.hparams.flatten(segment.grad))
    for key, p in offline.params.items():
        assert torch.equal(segment.state.params[key], p)


def test_the_default_horizon_is_500_steps_online():
    prob = make(linear_train_loss, 6, "sgd", "scalar")
    with torch.no_grad():
        state = initial_state(prob, differentiable=False)
    raw = prob.raw_tensors()
    auto = hd.methods.curvature().segment(prob, state, raw, 0, 6, prob.val_data)
    given = hd.methods.curvature(horizon=500).segment(prob, state, raw, 0, 6, prob.val_data)
    assert torch.equal(prob.hparams.flatten(auto.grad), prob.hparams.flatten(given.grad))


# --- the outer loop, the config and the refusals --------------------------------------------
def test_the_offline_loop_and_the_config_take_the_curvature_method():
    prob = make(linear_train_loss, 6, "sgd", "scalar")
    record = hd.HyperOptimizer(prob, method="curvature", lr=0.05).step()
    assert record.status == "ok" and abs(record.grad["wd"]) > 0
    method = configured_method(load_config(overrides=["outer.mode=offline",
                                                      "method.name=curvature",
                                                      "method.horizon=50"]))
    assert method.capabilities.offline and method.options["horizon"] == 50


def test_it_refuses_what_its_tangents_cannot_describe():
    prob = make(linear_train_loss, 4, "sgd", "scalar")
    nesterov = replace(prob, optimizer=hd.sgd(prob.optimizer.coefficients["lr"], 0.9,
                                              nesterov=True))
    with pytest.raises(hd.HyperdiffError, match=r"^curvature: the method carries the tangents "
                                                r"of heavy-ball SGD"):
        hd.methods.curvature()(nesterov)
    with pytest.raises(hd.HyperdiffError, match=r"^curvature: the method carries the tangents "
                                                r"of heavy-ball SGD"):
        hd.HyperOptimizer(nesterov, method="curvature")  # at construction, not at step 0
    for headed in (lambda: hd.truncated(2, head="curvature")(nesterov),  # the same model
                   lambda: hd.HyperOptimizer(nesterov, method=hd.truncated(2, head="curvature"))):
        with pytest.raises(hd.HyperdiffError, match=r"^truncated: head='curvature' carries the "
                                                    r"tangents of heavy-ball SGD"):
            headed()
    with pytest.raises(hd.HyperdiffError, match=r"^curvature: horizon must be 'auto', None or "
                                                r"a number > 0 \(got 'never'\)"):
        hd.methods.curvature(horizon="never")


def test_an_initialization_hyperparameter_is_refused_with_the_methods_that_take_it():
    params = mlp_params()
    hp = hd.HyperParameters(lr=hd.scalar(0.1), theta0=hd.initialization(params))
    x, y = sine_data(24, 5, seed=1)
    prob = hd.make_problem(linear_train_loss, val_loss, hp, params, optimizer=hd.sgd("lr", 0.5),
                           train_data=hd.minibatches(x, y, batch_size=6),
                           val_data=sine_data(16, 5, seed=2), steps=3, seed=0, probe=False)
    with pytest.raises(hd.HyperdiffError, match=r"^curvature: the problem must have no "
                                                r"initialization hyperparameter \(got 'theta0'"):
        hd.methods.curvature()(prob)


# --- a checkpoint written before SGD's coupled decay was carried ----------------------------
def test_an_online_checkpoint_without_the_decays_rows_resumes_with_them_zero():
    """Before this change an online run of SGD with a tuned weight decay carried the learning
    rate's rows only (z, zb: (3, n)); such a checkpoint resumes, the decay's row added as 0
    (its tangent starts at the resume), the learning rate's rows as saved."""
    from test_online_curvature import mlp_train_loss

    from hyperdiff.methods.curvature_rule import carried_rows

    prob = make(mlp_train_loss, 12, "sgd", "scalar")

    def loop():
        return hd.HyperOptimizer(prob, plan=hd.plans.OnlinePlan(window=3),
                                 method=hd.methods.curvature(horizon=20), optimizer="adam",
                                 lr=0.2, seed=3)

    first = loop()
    first.step()
    state = first.state_dict()
    before = carried_rows(prob, decay=False)
    assert before.tolist() == [0, 1, 2] and carried_rows(prob) is None  # wd is row 3
    old = {**state, "tangent": [t[before] if t.dim() == 2 else t for t in state["tangent"]]}
    second = loop()
    second.load_state_dict(old)
    loaded = second.state_dict()["tangent"]
    for saved, now in zip(state["tangent"], loaded, strict=True):
        if saved.dim() == 2:
            assert torch.equal(now[:3], saved[:3]) and not now[3].any() and saved[3].any()
        else:
            assert torch.equal(now, saved)
    assert all(r.status == "ok" for r in second.run().history)
    damaged = {**state, "tangent": [t[:2] if t.dim() == 2 else t for t in state["tangent"]]}
    with pytest.raises(hd.HyperdiffError, match="damaged"):
        loop().load_state_dict(damaged)
