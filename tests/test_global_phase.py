"""The offline loop's global phase (tuner/global_phase.py): the points, the hand-over to the
gradient phase, resume, the guard and the bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_driver import ridge_problem

import hyperdiff as hd
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.global_phase import explore_points, explored_names
from hyperdiff.tuner.offline_plan import OfflinePlan

LN10 = math.log(10.0)


def mixed_hparams():
    return hd.HyperParameters(lr=hd.scalar(0.1), frac=hd.scalar(0.2, (0.0, 1.0)),
                              shift=hd.scalar(0.5, "free"), soft=hd.scalar(1.0, "softplus"),
                              l2=hd.per_feature([1e-3, 1e-2, 1e-1]))


def test_points_move_scalar_log_and_interval_values_inside_the_box():
    hp = mixed_hparams()
    start = hp.raw
    points = explore_points(hp, start, 8, 1.5, seed=3)
    assert explored_names(hp) == ["lr", "frac"]
    assert len(points) == 8
    for p in points:
        for name in ("shift", "soft", "l2"):
            assert torch.equal(p[name], start[name])
        for name in ("lr", "frac"):
            d = (p[name] - start[name]).reshape(-1)[0]
            assert -1.5 * LN10 <= float(d) <= 1.5 * LN10
        # natural values: lr within 1.5 decades of 0.1 (the log transform)
        assert 0.1 * 10 ** -1.5 <= float(hp.natural(p)["lr"]) <= 0.1 * 10 ** 1.5


@pytest.mark.parametrize("count", [2, 4, 8])
def test_points_are_stratified_like_a_net(count):
    """A Sobol sequence's first 2^m points put exactly one point in each of the 2^m equal
    slices of every coordinate: in the box, one per slice of width 2 w / count."""
    hp = hd.HyperParameters(a=hd.scalar(1.0), b=hd.scalar(2.0))
    width = 2.0 * LN10
    for name in ("a", "b"):
        shifts = [float(p[name] - hp.raw[name]) for p in explore_points(hp, hp.raw, count, 2.0, 0)]
        slices = sorted(int((s + width) // (2 * width / count)) for s in shifts)
        assert slices == list(range(count))


def test_the_same_seed_gives_the_same_points_and_another_seed_others():
    hp = mixed_hparams()
    first, again = (explore_points(hp, hp.raw, 4, 2.0, seed=1) for _ in range(2))
    other = explore_points(hp, hp.raw, 4, 2.0, seed=2)
    assert all(torch.equal(a["lr"], b["lr"]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a["lr"], b["lr"]) for a, b in zip(first, other, strict=True))


def test_no_points_without_an_explored_name():
    hp = hd.HyperParameters(lam=hd.scalar(0.05, "free"))
    assert explore_points(hp, hp.raw, 4, 2.0, seed=0) == []
    problem, _ = ridge_problem()
    free = hd.make_problem(problem.train_loss, problem.val_loss, hp, problem.params,
                           optimizer=hd.sgd(0.1), train_data=problem.train_data,
                           val_data=problem.val_data, steps=5)
    loop = HyperOptimizer(free, plan=OfflinePlan(explore=4, explore_when="always"), stopping=Stopping(max_steps=3))
    assert loop.plan.gradient_start == 0 and loop.run().history[0].message == ""


def run_loop(explore=3, steps=8, lr=0.3, decades=1.0, lam=0.05, stop_at=None):
    problem, _ = ridge_problem(lam=lam)
    loop = HyperOptimizer(problem, plan=OfflinePlan(explore=explore, explore_decades=decades, explore_when="always"),
                          lr=lr, schedule="cosine",
                          stopping=Stopping(max_steps=steps, patience=None))
    while not loop.done and (stop_at is None or loop.step_index < stop_at):
        loop.step()
    return loop


def test_the_phase_trains_the_points_then_steps_from_the_best_with_a_fresh_optimizer():
    k, steps, lr = 3, 8, 0.3
    loop = run_loop(explore=k, steps=steps, lr=lr)
    history = loop.history
    points = explore_points(loop.hparams, loop.hparams.raw, k, 1.0, seed=0)
    log_lam = [math.log(r.hparams["lam"]) for r in history]
    assert log_lam[0] == pytest.approx(math.log(0.05), abs=1e-12)
    for j, point in enumerate(points, start=1):
        assert log_lam[j] == pytest.approx(float(point["lam"]), abs=1e-12)
        assert history[j].message.startswith(f"global phase: point {j} of {k}")
    # the gradient phase starts at the best of steps 0..k by the validation loss
    best = min(range(k + 1), key=lambda j: history[j].val_loss)
    assert log_lam[k + 1] == pytest.approx(log_lam[best], abs=1e-12)
    # its cosine runs over the steps after the phase: lr_s = lr (1 + cos(pi (s-k-1)/(T-k-1)))/2
    for s in range(k + 1, steps):
        expected = lr * 0.5 * (1 + math.cos(math.pi * (s - k - 1) / (steps - k - 1)))
        assert history[s].lr == pytest.approx(expected, rel=1e-12)
    # a fresh SignStep: the first step moves by lr_s * sign(g), the second by 1.5 or 0.5 x
    g1 = history[k + 1].grad["lam"] * history[k + 1].hparams["lam"]  # natural -> raw (log)
    g2 = history[k + 2].grad["lam"] * history[k + 2].hparams["lam"]
    step1 = log_lam[k + 2] - log_lam[k + 1]
    assert step1 == pytest.approx(-history[k + 1].lr * math.copysign(1, g1), rel=1e-9)
    if g1 * g2 > 0:
        assert log_lam[k + 3] - log_lam[k + 2] == pytest.approx(
            -1.5 * history[k + 2].lr * math.copysign(1, g2), rel=1e-9)


@pytest.mark.parametrize("stop_at", [2, 4, 6])
def test_a_resumed_run_repeats_the_straight_one(stop_at):
    straight = run_loop()
    first = run_loop(stop_at=stop_at)
    state = copy.deepcopy(first.state_dict())
    problem, _ = ridge_problem(lam=0.05)
    resumed = HyperOptimizer(problem, plan=OfflinePlan(explore=3, explore_decades=1.0, explore_when="always"), lr=0.3,
                             schedule="cosine", stopping=Stopping(max_steps=8, patience=None))
    resumed.load_state_dict(state, history=list(first.history))
    resumed.run()
    assert [r.hparams for r in resumed.history] == [r.hparams for r in straight.history]
    assert [r.val_loss for r in resumed.history] == [r.val_loss for r in straight.history]
    assert [r.lr for r in resumed.history] == [r.lr for r in straight.history]


def test_a_diverging_point_fails_without_cutting_the_gradient_phase_lr():
    # points up to 3 decades above lam = 0.05 make SGD at 0.1 diverge (lam > ~10)
    loop = run_loop(explore=4, steps=9, decades=3.0)
    failed = [r for r in loop.history if r.status == "failed"]
    assert failed and all(r.step <= 4 for r in failed)
    assert "global phase" in failed[0].message and "leaves the outer learning rate" in (
        failed[0].message)
    assert loop.history[5].lr == pytest.approx(0.3, rel=1e-12)  # the cosine's first: full lr
    assert loop.guard.scale == 1.0
    ok = [r for r in loop.history[:5] if r.status == "ok"]
    best = min(ok, key=lambda r: r.val_loss)
    assert loop.history[5].hparams["lam"] == pytest.approx(best.hparams["lam"], rel=1e-12)


def test_a_flat_point_does_not_stop_the_phase_as_converged():
    problem, _ = ridge_problem(lam=0.05)
    loop = HyperOptimizer(problem, plan=OfflinePlan(explore=3, explore_when="always"), lr=0.3,
                          stopping=Stopping(max_steps=6, grad_tol=1e9, patience=None))
    result = loop.run()
    assert len(result.history) == 5  # 0..3 the phase, then the first gradient step converges
    assert result.stop_reason.startswith("converged")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"explore": -1}, "HyperOptimizer: explore must be a non-negative int (got -1)"),
    ({"explore": 2.0}, "HyperOptimizer: explore must be a non-negative int (got 2.0)"),
    ({"explore_decades": 0}, "HyperOptimizer: explore_decades must be a number in (0, 10] "
                             "(got 0)"),
    ({"explore_decades": float("nan")}, "explore_decades must be a number in (0, 10]"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(hd.HyperdiffError, match=None) as err:
        OfflinePlan(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("mode", ["online", "meta"])
def test_the_config_refuses_explore_outside_offline_runs(mode, tmp_path):
    from hyperdiff.app.config import load_config
    from hyperdiff.app.experiment import run_experiment

    task = "sinusoid_maml" if mode == "meta" else "ridge_diabetes"
    config = load_config(overrides=[f"task.name={task}", f"outer.mode={mode}",
                                    "outer.explore=2"])
    with pytest.raises(hd.HyperdiffError, match=f"config: outer.explore must be 0 or its "
                       f"default 8 .*with outer.mode = '{mode}' .*got 2, 'weak'"):
        run_experiment(config, out=tmp_path / "run", progress=False, log=lambda _m: None)


def test_the_config_passes_explore_to_the_offline_plan():
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build

    config = load_config(overrides=["task.name=ridge_diabetes", "outer.explore=3",
                                    "outer.explore_decades=1.5", "outer.explore_when=always"])
    _task, loop = build(config)
    assert (loop.plan.explore, loop.plan.explore_decades, loop.plan.gradient_start) == (3, 1.5, 4)


def test_early_stopping_counts_from_the_gradient_phase():
    """The best of the phase at step 0 (the start) and ``patience`` steps without a better
    one: the run stops ``patience`` steps after the phase, not ``patience`` after step 0."""
    problem, _ = ridge_problem(lam=0.05)
    loop = HyperOptimizer(problem, plan=OfflinePlan(explore=4, explore_when="always"), lr=1e-9,
                          stopping=Stopping(max_steps=30, patience=3, min_delta=1.0))
    result = loop.run()
    assert result.best_step == 0
    assert len(result.history) == 5 + 3  # steps 0..4 the phase, 5..7 the gradient phase
    assert result.stop_reason.startswith("early stopping")
