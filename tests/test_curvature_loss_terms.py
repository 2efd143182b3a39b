"""``curvature(loss_terms=...)``: the train loss's hyperparameters (a penalty, not an optimizer
coefficient) with the window's earlier steps' effect, through the gradient's Jacobian frozen at
the last step. Where that Jacobian is constant and the curvature model exact (a loss linear in
theta, ``curvature_scale=0``), against exact reverse mode over the whole training (offline),
forward mode (RTHO) window by window (``carried``) and reverse-mode windows (``window``); the
option's refusals, its run through the config and a resume (float64, tiny problems)."""

from __future__ import annotations

import pytest
import torch
from interrupt import interrupted_run
from test_offline_curvature import BETAS, assert_close
from test_online import mlp_params, val_loss
from test_online_curvature import linear_train_loss
from test_resume import histories, quiet

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.plans import build_online
from hyperdiff.engine.training import initial_state

from conftest import sine_data

DT = torch.float64


def penalised_linear_loss(p, h, batch):
    """Linear in theta, with two penalty hyperparameters whose gradient terms ``d g / d pen``
    are constants (the same at every step and batch): ``pen`` (scalar) and ``tpen`` (one per
    parameter tensor)."""
    terms = {"W1": p["W1"].sum() * 0.3, "b1": -p["b1"].sum() * 0.1, "W2": p["W2"].sum() * 0.2}
    penalty = h["pen"] * sum(terms.values())
    penalty = penalty + sum(h.at("tpen", param=k) * v for k, v in terms.items())
    return linear_train_loss(p, h, batch) + penalty


def make(kind, steps=10, train_loss=penalised_linear_loss):
    """A warmup-cosine learning rate (3 raw values), ``pen`` and ``tpen``; ``kind``: ``sgd0``
    (plain SGD), ``sgd`` (momentum 0.7), ``adam`` (coupled decay 0.1), ``adamw`` (a decay
    hyperparameter ``wd``, carried)."""
    sched = hd.schedule("warmup_cosine", steps)
    values = sched.hyperparameters(peak=0.05 if kind.startswith("adam") else 0.2, warmup=0.2,
                                   final=0.3)
    values["pen"] = hd.scalar(0.5)
    values["tpen"] = hd.per_tensor(mlp_params(), {"W1": 0.2, "b1": 0.4, "W2": 0.3})
    if kind == "sgd0" or kind == "sgd":
        optimizer = hd.sgd(sched, 0.0 if kind == "sgd0" else 0.7)
    elif kind == "adam":
        optimizer = hd.adam(sched, BETAS, 1e-6, weight_decay=0.1)
    else:
        values["wd"] = hd.scalar(0.3)
        optimizer = hd.adamw(sched, BETAS, 1e-6, weight_decay="wd")
    x, y = sine_data(24, 5, seed=1)
    xv, yv = sine_data(16, 5, seed=2)
    return hd.make_problem(train_loss, val_loss, hd.HyperParameters(**values), mlp_params(),
                           optimizer=optimizer, train_data=hd.minibatches(x, y, batch_size=6),
                           val_data=(xv, yv), steps=steps, seed=0, probe=False)


KINDS = ["sgd0", "sgd", "adam", "adamw"]
PENALTIES = ("pen", "tpen")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss_terms", ["window", "carried"])
def test_with_a_constant_jacobian_the_offline_call_is_reverse_mode(kind, loss_terms):
    """Reverse mode through all T steps is the independent reference; the last step alone
    (today's ``last``) misses most of the penalties' hypergradient."""
    prob = make(kind)
    exact = hd.reverse()(prob)
    ours = hd.methods.curvature(horizon=None, curvature_scale=0.0, loss_terms=loss_terms)(prob)
    assert ours.value == pytest.approx(exact.value, rel=1e-13)
    assert_close(ours.grad, exact.grad, 1e-12)
    last = hd.methods.curvature(horizon=None, curvature_scale=0.0)(prob)
    for name in PENALTIES:  # (Adam's near-constant b1 gradient makes its tpen entry ~0)
        biggest = exact.grad[name].abs().max()
        assert biggest > 1e-3, name
        assert (last.grad[name] - exact.grad[name]).abs().max() > 0.3 * biggest, name


def segments(method, prob, windows, size):
    """The method's segments over ``windows`` windows of ``size`` steps at the start's values,
    each from the previous one's state and carry."""
    raw = prob.hparams.raw
    state = initial_state(prob, differentiable=False)
    carry = None  # each method's zero tangent at the start of the run
    out = []
    for w in range(windows):
        seg = method.segment(prob, state, raw, w * size, (w + 1) * size, prob.val_data, carry)
        out.append((state, seg))
        state, carry = seg.state, seg.carry
    return out


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_carried_windows_are_forward_mode_window_by_window(kind):
    """``carried``, never forgetting: each window's hypergradient is RTHO's (forward mode
    carried from theta_0) for every raw value, the learning rate's and the penalties'."""
    prob = make(kind, steps=12)
    ours = segments(hd.methods.curvature(horizon=None, curvature_scale=0.0,
                                         loss_terms="carried"), prob, 4, 3)
    rtho = segments(hd.forward(engine="double_vjp"), prob, 4, 3)
    for (_, a), (_, b) in zip(ours, rtho, strict=True):
        assert a.value == pytest.approx(b.value, rel=1e-12)
        assert_close(a.grad, b.grad, 1e-10)
    assert all(ours[-1][1].grad[n].abs().max() > 1e-3 for n in PENALTIES)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_window_mode_gives_the_penalties_reverse_mode_s_window(kind):
    """``window``: the loss-term row starts over in each window, so a penalty's hypergradient
    is exact reverse mode through that window from its start state held constant (the
    learning rate's rows still carry over windows: not compared)."""
    prob = make(kind, steps=12)
    raw = prob.hparams.raw
    ours = segments(hd.methods.curvature(horizon=None, curvature_scale=0.0,
                                         loss_terms="window"), prob, 4, 3)
    for w, (state, seg) in enumerate(ours):
        window = hd.reverse().segment(prob, state, raw, 3 * w, 3 * w + 3, prob.val_data)
        assert_close({n: seg.grad[n] for n in PENALTIES},
                     {n: window.grad[n] for n in PENALTIES}, 1e-11)
        if w:  # after the first window the carried run differs from the window's own
            carried = segments(hd.methods.curvature(horizon=None, curvature_scale=0.0,
                                                    loss_terms="carried"), prob, w + 1, 3)
            assert (carried[-1][1].grad["pen"] - seg.grad["pen"]).abs() > 1e-4


def test_without_a_loss_hyperparameter_it_changes_nothing():
    """A train loss that reads no hyperparameter: the added row's part is 0 and the learning
    rate's hypergradients are ``last``'s, bit for bit."""
    prob = make("adamw", train_loss=lambda p, h, b: val_loss(p, h, b))
    last = segments(hd.methods.curvature(), prob, 3, 3)
    carried = segments(hd.methods.curvature(loss_terms="carried"), prob, 3, 3)
    for (_, a), (_, b) in zip(last, carried, strict=True):
        for name in a.grad:
            assert torch.equal(a.grad[name], b.grad[name]), name
    assert carried[0][1].carry.z.shape[0] == last[0][1].carry.z.shape[0] + 1


def test_a_bad_value_is_refused_by_name():
    with pytest.raises(hd.HyperdiffError, match=r"loss_terms must be one of \['last', "
                                                r"'window', 'carried'\].*'all'"):
        hd.methods.curvature(loss_terms="all")
    with pytest.raises(hd.HyperdiffError, match="loss_terms"):
        build_online(load_config(overrides=["task.name=ridge_diabetes", "outer.mode=online",
                                            "method.loss_terms=every"]))


def test_the_option_is_recorded_only_when_set():
    assert "loss_terms" not in hd.methods.curvature().options  # older runs' records unchanged
    assert hd.methods.curvature(loss_terms="window").options["loss_terms"] == "window"


SETTINGS = ["output.checkpoint_seconds=0", "task.name=ridge_diabetes", "outer.mode=online",
            "inner.steps=60", "outer.window=10", "method.loss_terms=carried", "report.seeds=1"]


def test_an_online_run_with_the_option_resumes_to_the_same_history(tmp_path):
    straight = tmp_path / "straight"
    run_experiment(load_config(overrides=SETTINGS), out=straight, log=quiet, progress=False)
    out = tmp_path / "interrupted"
    interrupted_run(out, SETTINGS, at=3)
    assert len(histories(out)) == 3
    run_experiment(None, resume=out, log=quiet, progress=False)
    assert histories(out) == histories(straight)
    _, loop = build_online(load_config(overrides=SETTINGS))
    assert loop.method.options["loss_terms"] == "carried"
