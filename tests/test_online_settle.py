"""Settled online runs (tuner/settling.py): the plain rest of the run against a hand-written
heavy-ball training at the settled values (float64, bit for bit), the rule against values
written out, a run that never settles against one without the rule, resume before, at and
after settling, and damaged checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from online_resume import assert_resumes_bit_for_bit
from test_online import recipe, train_loss

import hyperdiff as hd
from hyperdiff.tuner.settling import WINDOWS, Settling, largest_change

STEPS, WINDOW = 30, 3  # windows [0, 3), [3, 6), ..., [27, 30)


def tuner(method=None, steps=STEPS, lr=0.05, **settle):
    """An online loop on the float64 MLP of test_online (SGD with a tuned lr, momentum and
    weight decay), windows of 3 steps, Adam outer steps."""
    return hd.HyperOptimizer(recipe(steps), plan=hd.plans.OnlinePlan(window=WINDOW, **settle),
                             method=method or hd.reverse(), optimizer="adam", lr=lr)


def by_hand(problem, params, momentum, values, start, stop):
    """Heavy-ball SGD with the weight decay in the loss, written out: ``b <- mu b + g``,
    ``theta <- theta - lr b`` (``b = g`` at step 0), steps ``start .. stop-1``."""
    lr, mu, wd = values["lr"], values["momentum"], values["wd"]
    theta = {k: v.clone() for k, v in params.items()}
    buf = {k: v.clone() for k, v in momentum.items()}
    for t in range(start, stop):
        leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
        loss = train_loss(leaves, {"wd": wd}, problem.train_data.batch(t, problem.seed))
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        buf = {k: grads[k] if t == 0 else buf[k] * mu + grads[k] for k in theta}
        theta = {k: theta[k] - lr * buf[k] for k in theta}
    return theta, buf


def settled_run(loop):
    """Step ``loop`` until its plan settled; the record of the settling window."""
    while loop.plan.settled_at is None:
        record = loop.step()
    return record


def test_the_plain_rest_is_a_hand_written_training_at_the_settled_values():
    loop = tuner(settle=0.5)
    record = settled_run(loop)
    assert loop.plan.settled_at == 15 == loop.plan.inner_step  # first window end >= 0.5 * 30
    assert "tuning settled: the run reached 50% of its steps" in record.message
    assert "steps 15..29 train plainly" in record.message
    settled = loop.hparams.natural(loop.raw)
    state, raw = loop.plan.state, loop.raw
    result = loop.run()
    # the values stay where they settled: the plain windows take no outer step
    for name, value in result.final_raw.items():
        assert torch.equal(value, raw[name])
    plain = list(result.history)[5:]  # windows 0..4 tuned, [0, 15)
    assert [r.step for r in plain] == [5, 6, 7, 8, 9] and result.steps == STEPS
    for r in plain:
        assert r.grad is None and r.val_loss is None and r.grad_norm is None
        assert r.message == "plain window at the settled values" and r.status == "ok"
        assert r.hparams == result.history[5].hparams
    theta, _ = by_hand(loop.plan.problem, state.params, state.opt_state.momentum, settled,
                       15, STEPS)
    for k, v in theta.items():
        assert torch.equal(result.params[k], v), k
    # the selection loss is still recorded at the run's end (none given here: None)
    assert result.history[-1].selection_loss is None


def test_values_that_do_not_move_settle_at_the_first_window_allowed_and_train_plainly():
    """Outer lr 0: the values never change (relative change 0 < tol). The rule needs WINDOWS
    windows before and the hot-start measure's point (10% of 30 steps: step 3) behind it, so
    the run settles after the second window (step 6); the whole run is then one plain
    training at the start values, by hand from theta_0."""
    loop = tuner(lr=0.0, settle_tol=1e-3)
    result = loop.run()
    assert WINDOWS == 2 and loop.plan.settled_at == 6
    assert "changed by at most 0 (relative) over the last 2 windows" in result.history[1].message
    assert [r.grad is None for r in result.history] == [False, False] + [True] * 8
    problem = loop.plan.problem
    start = problem.hparams.natural(problem.hparams.raw)
    zeros = {k: torch.zeros_like(v) for k, v in problem.params.items()}
    theta, _ = by_hand(problem, problem.params, zeros, start, 0, STEPS)
    for k, v in theta.items():  # windows 0-1 trained by reverse mode's graph: rounding only
        assert torch.allclose(result.params[k], v, rtol=0, atol=1e-13), k


def test_the_rule_against_values_written_out():
    rule = Settling(after=1.0, tol=0.02)
    earlier = [{"lr": 0.1, "wd": [1e-3, 2e-3]}, {"lr": 0.1, "wd": [1e-3, 2e-3]}]
    # 0.1 -> 0.1019: 1.9%; wd 2e-3 -> 2.03e-3: 1.5%
    assert rule.reason(20, 100, {"lr": 0.1019, "wd": [1e-3, 2.03e-3]}, earlier) is not None
    assert rule.reason(20, 100, {"lr": 0.1021, "wd": [1e-3, 2e-3]}, earlier) is None  # 2.1%
    assert rule.reason(20, 100, {"lr": 0.1, "wd": [1e-3, 2e-3]}, earlier[:1]) is None  # 1 window
    assert Settling(after=0.4).reason(39, 100, {}, []) is None
    assert Settling(after=0.4).reason(40, 100, {}, []) is not None
    assert Settling().never and not Settling(tol=0.1).never
    assert largest_change({"a": 2.0, "b": [1.0, -4.0]}, {"a": 2.5, "b": [1.0, -3.0]}) == 0.25
    assert largest_change({"a": 0.0}, {"a": 1e-9}) == math.inf
    assert largest_change({"a": 0.0}, {"a": 0.0}) == 0.0 == largest_change({}, {})


@pytest.mark.parametrize("settle", [{}, {"settle": 1.0}, {"settle_tol": 1e-12}])
def test_a_run_that_never_settles_is_the_run_without_the_rule(settle):
    plain = tuner().run()
    other = tuner(**settle).run()
    assert [r.without_timing() for r in other.history] == \
        [r.without_timing() for r in plain.history]
    assert all(torch.equal(other.params[k], v) for k, v in plain.params.items())


@pytest.mark.parametrize("windows", [3, 5, 6, 8])  # before, at (after window 4), after it
def test_resume_before_at_and_after_settling_is_bit_for_bit(tmp_path, windows):
    resumed, whole = assert_resumes_bit_for_bit(
        lambda: tuner(hd.methods.curvature(horizon=20), settle=0.5), tmp_path, windows=windows)
    assert resumed.plan.settled_at == 15 and resumed.plan.tangent is None
    assert sum(r.grad is None for r in whole.history) == 5


def test_a_settled_run_drops_the_carry_and_its_checkpoint_is_checked():
    loop = tuner(hd.methods.curvature(horizon=20), settle=0.5)
    loop.step()
    assert loop.plan.tangent is not None
    settled_run(loop)
    assert loop.plan.tangent is None
    state = loop.state_dict()
    assert state["settled_at"] == 15 and state["tangent"] is None
    for bad, message in ((0, r"settled_at must be None or an inner step in 1\.\.15"),
                         (16, r"settled_at must be None or an inner step in 1\.\.15"),
                         (15.0, "got 15.0"), (None, "tangent must be a list of")):
        with pytest.raises(hd.HyperdiffError, match=message):
            tuner(hd.methods.curvature(horizon=20), settle=0.5).load_state_dict(
                {**state, "settled_at": bad})
    older = {k: v for k, v in state.items() if k != "settled_at"}  # a tangent is then due
    with pytest.raises(hd.HyperdiffError, match="tangent must be a list of"):
        tuner(hd.methods.curvature(horizon=20), settle=0.5).load_state_dict(older)


@pytest.mark.parametrize(("options", "message"), [
    ({"settle": 0.0}, r"HyperOptimizer: settle must be a finite number in \(0, 1\] \(got 0.0\)"),
    ({"settle": 1.5}, r"settle must be a finite number in \(0, 1\] \(got 1.5\)"),
    ({"settle_tol": -0.1}, r"settle_tol must be a finite number >= 0 \(got -0.1\)"),
    ({"settle_tol": math.nan}, r"settle_tol must be a finite number >= 0 \(got nan\)"),
])
def test_bad_settling_options_are_refused(options, message):
    with pytest.raises(hd.HyperdiffError, match=message):
        hd.plans.OnlinePlan(**options)


def test_the_cli_keys_reach_the_plan():
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build_online

    config = load_config(overrides=["task.name=mlp_digits", "outer.mode=online",
                                    "inner.steps=40", "outer.settle=0.25",
                                    "outer.settle_tol=0.01"])
    _, loop = build_online(config)
    assert loop.plan.settling == Settling(after=0.25, tol=0.01)


def test_settling_before_the_last_window_trains_the_same_model():
    """The last window's outer step moves values that no step trains with: settling at its
    start (settle = 0.9: step 27 of 30) trains the run's model bit for bit as the run that
    tunes to the end (curvature's windows train with the same arithmetic as a plain step);
    only the final values differ, by the one outer step left out."""
    method = hd.methods.curvature(horizon=20)
    tuned = tuner(method).run()
    settled = tuner(method, settle=0.9).run()
    assert [r.grad is None for r in settled.history] == [False] * 9 + [True]
    for k, v in tuned.params.items():
        assert torch.equal(settled.params[k], v), k
    assert settled.history[-1].hparams == tuned.history[-1].hparams  # the values trained with
    assert not torch.equal(settled.final_raw["lr"], tuned.final_raw["lr"])


def test_an_online_run_settles_at_75_percent_by_default_and_old_run_directories_never(tmp_path):
    from hyperdiff.app.config import ONLINE_SETTLE, legacy_values, load_config

    fresh = load_config(overrides=["task.name=mlp_digits", "outer.mode=online"])
    assert fresh.outer.settle == ONLINE_SETTLE == 0.75
    assert load_config(overrides=["task.name=mlp_digits"]).outer.settle == 1.0  # offline
    # horizon_digits keeps the runs its docs measured (constant windows, tuned to the end)
    assert load_config(overrides=["task.name=horizon_digits"]).outer.settle == 1.0
    assert load_config(overrides=["task.name=mlp_digits", "outer.mode=online",
                                  "outer.settle=1"]).outer.settle == 1.0  # set: as set
    path = tmp_path / "config.toml"  # a run directory's config from before outer.settle
    path.write_text('[task]\nname = "mlp_digits"\n[outer]\nmode = "online"\n'
                    'window_growth = 0.2\nbeta1 = 0.5\nbeta2 = 0.99\nexplore_when = "broken"\n')
    assert load_config(path, stored=True).outer.settle == 1.0
    assert legacy_values({"outer": {"settle": 0.75}})["outer"]["settle"] == 0.75


def test_a_run_with_a_sampled_choice_tunes_to_the_end():
    """A plain window would have no choice to draw: with discrete hyperparameters the rule is
    off (the same records as without it)."""
    from test_plans import choice_problem

    def run(**settle):
        loop = hd.HyperOptimizer(choice_problem(steps=15), plan=hd.plans.OnlinePlan(
            window=3, **settle), method=hd.reverse(), lr=0.01)
        return loop, loop.run()

    loop, settled = run(settle=0.5)
    _, tuned = run()
    assert loop.plan.settled_at is None and loop.plan.settling.never
    assert all(r.grad is not None for r in settled.history)
    assert [r.without_timing() for r in settled.history] == \
        [r.without_timing() for r in tuned.history]


def test_a_plain_window_that_diverges_fails_by_the_guard_and_the_run_goes_on():
    """After settling, a learning rate that makes training diverge (set here by hand: 1e6
    on the float64 MLP; the first plain window's train loss reaches 5e24, finite in float64)
    fails that window by the guard's absurd-loss rule against the settling window's train
    loss (before, it went on as "ok" up to 8e187). The guard puts back the last good step's
    values (those the settling window trained with) and the state before the failed window,
    and the rest of the run is a hand-written heavy-ball training at them."""
    loop = tuner(settle=0.5)
    settling = settled_run(loop)
    state, good = loop.plan.state, loop.guard.good["raw"]
    raw = dict(loop.raw)
    raw["lr"] = torch.full_like(raw["lr"], math.log(1e6))
    loop.set_raw(raw)
    result = loop.run()
    failed = [r for r in result.history if r.status == "failed"]
    assert [r.step for r in failed] == [5]
    assert (f"the train loss 5.26e+24 is absurd: more than 1e+06 x max(|last tuned window's "
            f"loss| {settling.train_loss:.3g}, 1)") in failed[0].message
    assert all(r.status == "ok" and r.hparams == settling.hparams
               for r in result.history[6:])
    values = loop.hparams.natural(good)
    theta, _ = by_hand(loop.plan.problem, state.params, state.opt_state.momentum, values,
                       15, STEPS)
    for k, v in theta.items():
        assert torch.equal(result.params[k], v), k
