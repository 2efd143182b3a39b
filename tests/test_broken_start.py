"""The global phase after a broken start only (``explore_when="broken"``) and the outer
schedule ``"auto"``: when the phase runs, that it leaves a good start's run untouched, a failed
start rescued, resume, the config and stored configs."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
from test_driver import ridge_problem

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.methods.base import Method
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.global_phase import explore_points
from hyperdiff.tuner.offline_plan import OfflinePlan

GOOD, BROKEN, FAILED = 0.05, 10.0, 20.0
"""ridge_problem's lam: SGD at lr 0.1 multiplies w by about 1 - 0.2 lam per step from the
penalty (and a little more from the data), so lam 10 oscillates with a factor above 1 (20
steps: validation loss 56, the untrained model's 2.9: broken but finite) and lam 20 blows up
(5e17: the guard calls step 0 absurd); lam below about 9 trains."""


K = 4  # points: a power of 2, so one of them lies in each quarter of the box (0.1 x .. 10 x)


def loop_for(lam, explore=K, when="broken", steps=8, **kwargs):
    problem, _ = ridge_problem(lam=lam)
    plan = OfflinePlan(explore=explore, explore_decades=1.0, explore_when=when)
    return HyperOptimizer(problem, plan=plan, lr=0.3,
                          stopping=Stopping(max_steps=steps, patience=None), **kwargs)


def untrained_val_loss():
    """The untrained model (w = 0) on ridge_problem's validation split: mean(y_val^2)."""
    problem, _ = ridge_problem()
    _xv, yv = problem.val_data[0]
    return float(yv.square().mean())


def test_a_good_start_runs_exactly_as_without_a_phase():
    plain = loop_for(GOOD, explore=0).run()
    broken_mode = loop_for(GOOD).run()
    assert broken_mode.history[0].val_loss < untrained_val_loss()
    assert [r.hparams for r in broken_mode.history] == [r.hparams for r in plain.history]
    assert [r.val_loss for r in broken_mode.history] == [r.val_loss for r in plain.history]
    assert [r.message for r in broken_mode.history] == [""] * 8


def test_a_start_that_trains_worse_than_untrained_gets_the_phase():
    loop = loop_for(BROKEN)
    history = loop.run().history
    untrained = untrained_val_loss()
    assert math.isfinite(history[0].val_loss) and history[0].val_loss > 10 * untrained
    assert history[0].message == (
        f"global phase: the start (the start trained to validation loss "
        f"{history[0].val_loss:.3g} >= {untrained:.3g}, the untrained model's)")
    points = explore_points(loop.hparams, loop.hparams.raw, K, 1.0, seed=0)
    for j, point in enumerate(points, start=1):
        assert math.log(history[j].hparams["lam"]) == pytest.approx(float(point["lam"]),
                                                                    abs=1e-12)
        assert history[j].message.startswith(f"global phase: point {j} of {K}")
    best = min((r for r in history[:K + 1] if r.status == "ok"), key=lambda r: r.val_loss)
    assert history[K + 1].hparams["lam"] == pytest.approx(best.hparams["lam"], rel=1e-12)
    assert history[K + 1].val_loss < untrained


def test_a_failed_start_goes_on_to_the_points_instead_of_ending_the_run():
    with pytest.raises(hd.NonFiniteError, match="the initial hyperparameters already fail"):
        loop_for(FAILED, explore=0).run()
    loop = loop_for(FAILED)
    history = loop.run().history
    assert history[0].status == "failed" and "global phase: the start" in history[0].message
    assert "leaves the outer learning rate as it was" in history[0].message
    points = explore_points(loop.hparams, loop.hparams.raw, K, 1.0, seed=0)
    assert [math.log(r.hparams["lam"]) for r in history[1:K + 1]] == pytest.approx(
        [float(p["lam"]) for p in points], abs=1e-12)
    ok = [r for r in history[:K + 1] if r.status == "ok"]
    best = min(ok, key=lambda r: r.val_loss)
    assert history[K + 1].hparams["lam"] == pytest.approx(best.hparams["lam"], rel=1e-12)
    assert history[K + 1].status == "ok" and history[K + 1].lr == 0.3
    assert loop.guard.scale == 1.0  # the phase's failures cut nothing


def test_always_also_goes_on_from_a_failed_start():
    history = loop_for(FAILED, when="always").run().history
    assert history[0].status == "failed" and len(history) == 8


@pytest.mark.parametrize("lam", [GOOD, BROKEN, FAILED])
@pytest.mark.parametrize("stop_at", [1, 3, 5])
def test_a_resumed_run_repeats_the_straight_one(lam, stop_at):
    straight = loop_for(lam).run()
    first = loop_for(lam)
    while first.step_index < stop_at:
        first.step()
    state = copy.deepcopy(first.state_dict())
    assert ("explored" in state) and state["explored"] == (lam != GOOD)
    resumed = loop_for(lam)
    resumed.load_state_dict(state, history=list(first.history))
    result = resumed.run()
    assert [r.hparams for r in result.history] == [r.hparams for r in straight.history]
    assert [r.val_loss for r in result.history] == [r.val_loss for r in straight.history]
    assert [r.message for r in result.history] == [r.message for r in straight.history]


def test_bad_explore_when_is_refused():
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: explore_when must be one "
                       r"of \['always', 'weak', 'broken'\] \(got 'never'\)"):
        OfflinePlan(explore=2, explore_when="never")


def test_the_config_passes_explore_when_and_refuses_other_words():
    from hyperdiff.app.plans import build

    config = load_config(overrides=["task.name=ridge_diabetes", "outer.explore=3",
                                    "outer.explore_when=broken"])
    _task, loop = build(config)
    assert loop.plan.explore_when == "broken" and loop.plan.gradient_start == 0
    with pytest.raises(hd.HyperdiffError, match="outer.explore_when"):
        load_config(overrides=["outer.explore_when=sometimes"])


def test_a_stored_config_without_explore_when_reads_as_it_ran(tmp_path):
    """Written before ``outer.explore_when``: its explore points ran after every start; before
    ``outer.explore``: none."""
    fresh = load_config()
    stored = tmp_path / "config.toml"
    stored.write_text('[outer]\nexplore = 4\nwindow_growth = 0.0\n', encoding="utf-8")
    assert load_config(stored, stored=True).outer.explore_when == "always"
    stored.write_text('[outer]\nwindow_growth = 0.0\n', encoding="utf-8")
    old = load_config(stored, stored=True).outer
    assert (old.explore, old.explore_when) == (0, "always")
    stored.write_text('[outer]\nexplore = 4\nexplore_when = "broken"\nwindow_growth = 0.0\n',
                      encoding="utf-8")
    assert load_config(stored, stored=True).outer.explore_when == "broken"
    assert fresh.outer.schedule == "auto"


# --- the outer schedule "auto" ---------------------------------------------------------------

def test_auto_schedule_is_constant_for_signstep_and_cosine_otherwise():
    steps, lr = 6, 0.3
    signstep = loop_for(GOOD, explore=0, steps=steps).run().history
    assert [r.lr for r in signstep] == [lr] * steps
    adam = loop_for(GOOD, explore=0, steps=steps, optimizer="adam").run().history
    expected = [lr * 0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)]
    assert [r.lr for r in adam] == pytest.approx(expected, rel=1e-12)
    cosine = loop_for(GOOD, explore=0, steps=steps, schedule="cosine").run().history
    assert [r.lr for r in cosine] == pytest.approx(expected, rel=1e-12)


def test_auto_signstep_moves_a_value_with_a_steady_sign_as_its_formula_says():
    """SignStep at a constant rate: a hypergradient of one sign for s steps moves the raw
    value by lr (1 + 1.5 + ... + 1.5^(s-1)) (scales capped at 10)."""
    problem, _ = ridge_problem(lam=1e-6)  # far too small: the validation loss wants more
    loop = HyperOptimizer(problem, lr=0.05, stopping=Stopping(max_steps=6, patience=None))
    history = loop.run().history
    signs = {math.copysign(1.0, r.grad["lam"]) for r in history[:5]}
    assert len(signs) == 1
    moved = [math.log(b.hparams["lam"] / a.hparams["lam"])
             for a, b in itertools.pairwise(history)]
    sign = signs.pop()
    expected = [-sign * 0.05 * min(1.5 ** s, 10.0) for s in range(5)]
    assert moved == pytest.approx(expected, rel=1e-9)


def test_bad_schedule_is_refused():
    problem, _ = ridge_problem()
    with pytest.raises(hd.HyperdiffError, match=r"schedule must be one of \['auto', "
                       r"'constant', 'cosine'\] \(got 'linear'\)"):
        HyperOptimizer(problem, schedule="linear")


def chaotic_at_start(factor: float = 1e6) -> Method:
    """Reverse mode whose first call's hypergradient is ``factor`` x the true one (the loss
    unchanged): a start whose hypergradient is far above its loss, as a chaotic training's."""
    from dataclasses import replace

    inner, calls = hd.reverse(), {"n": 0}

    def run(problem, raw):
        result = inner.run(problem, raw)
        calls["n"] += 1
        if calls["n"] == 1:
            return replace(result, grad={k: g * factor for k, g in result.grad.items()})
        return result

    return Method("chaotic_at_start", run)


@pytest.mark.parametrize(("factor", "phase"), [(1e6, True), (10.0, False)])
def test_a_chaotic_start_gets_the_phase(factor, phase):
    """Ratio of the hypergradient norm to max(|L_val|, 1) above 1e3: the phase runs; a
    hypergradient 10x too large at a good start (ratio well below 1e3) changes nothing."""
    history = loop_for(GOOD, method=chaotic_at_start(factor)).run().history
    record = history[0]
    ratio = record.grad_norm / max(abs(record.val_loss), 1.0)
    assert (ratio > 1e3) == phase
    assert record.val_loss < untrained_val_loss()  # the training itself is fine
    if phase:
        assert record.message == (
            f"global phase: the start (its hypergradient norm {record.grad_norm:.3g} is above "
            f"1e+03 x max(|validation loss| {record.val_loss:.3g}, 1): chaotic)")
        assert history[1].message.startswith(f"global phase: point 1 of {K}")
    else:
        assert [r.message for r in history] == [""] * len(history)


def test_step_0_evaluates_the_untrained_model_once(monkeypatch):
    """The guard's reference and the broken-start test share one evaluation."""
    from hyperdiff.tuner import offline_plan

    calls = []
    real = offline_plan.untrained_losses

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(offline_plan, "untrained_losses", counting)
    loop_for(GOOD, steps=2).run()
    assert len(calls) == 1
