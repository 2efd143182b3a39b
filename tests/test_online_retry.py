"""The online retries of a weak or hot start (:mod:`hyperdiff.tuner.online_retry`) on the
least-squares problem of ``test_online_rescue.py``, whose first window has a closed form:
full-batch gradient descent on ``mean((X w - y)^2) + wd |w|^2`` from ``w = 0`` is
``w_K = (I - (I - lr A)^K) A^{-1} b`` with ``A = 2 X^T X / n + 2 wd I``, ``b = 2 X^T y / n``.
From it (float64, by hand) which decade a weak start climbs to (the first whose window, at its
pace over the run, removes 10% of the untrained validation loss) and whether a start above the stability limit ``2 / L`` is
hot; the tries are in the history, the run goes on as a fresh one from the value reached, resume
anywhere repeats it bit for bit, and a healthy start runs exactly as without the rule."""

from __future__ import annotations

import pytest
import torch
from test_online_rescue import (
    DT,
    STEPS,
    WINDOW,
    D,
    assert_goes_on_as,
    assert_same_run,
    data,
    loss,
    problem,
    stable_limit,
)

import hyperdiff as hd
from hyperdiff.app.config import legacy_values, load_config
from hyperdiff.app.rundir import RunDir
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.online_retry import HOT, WEAK, start_verdict
from hyperdiff.tuner.plans import OnlinePlan

WD = 1e-3  # problem()'s weight decay


def loop(lr: float, retry: int = 2, rescue: int = 3, **options) -> HyperOptimizer:
    return HyperOptimizer(problem(lr), plan=OnlinePlan(window=WINDOW, rescue=rescue,
                                                       retry=retry),
                          method="reverse", optimizer="adam", lr=0.1, **options)


def first_window(lr: float) -> tuple[float, float]:
    """``(L, U)``: the validation loss after the first window's K steps at ``lr`` from
    ``w = 0`` (closed form above) and the untrained model's, ``mean(y_val^2)``."""
    x, y = data(0)
    xv, yv = data(1)
    n = x.shape[0]
    a = 2.0 * x.T @ x / n + 2.0 * WD * torch.eye(x.shape[1], dtype=DT)
    b = 2.0 * x.T @ y / n
    step = torch.eye(a.shape[0], dtype=DT) - lr * a
    w = (torch.eye(a.shape[0], dtype=DT) - torch.linalg.matrix_power(step, WINDOW)) @ \
        torch.linalg.solve(a, b)
    return float(((xv @ w - yv) ** 2).mean()), float((yv**2).mean())


PACE = STEPS / WINDOW  # the run's steps over the first window's


def removes(lr: float) -> float:
    """The share of ``max(U, 1)`` that the first window at ``lr`` removes."""
    val, untrained = first_window(lr)
    return (untrained - val) / max(untrained, 1.0)


def weak(lr: float) -> bool:
    """Whether the run at the first window's pace removes under WEAK of ``max(U, 1)``."""
    return removes(lr) * PACE < WEAK


@pytest.mark.parametrize("lr", [1e-4, 2e-4, 1e-3])
def test_a_weak_start_climbs_to_the_first_decade_that_is_not_weak(lr):
    j = next(j for j in range(3) if not weak(lr * 10**j))
    assert j == {1e-4: 2, 2e-4: 1, 1e-3: 1}[lr]  # the cases are those they say
    history = loop(lr).run().history
    assert [r.status for r in history[:j + 1]] == ["failed"] * j + ["ok"]
    assert [r.hparams["lr"] for r in history[:j + 1]] == pytest.approx(
        [lr * 10**i for i in range(j + 1)], rel=1e-12)
    for i, record in enumerate(history[:j]):
        assert f"weak start: the first window removed {removes(lr * 10**i):.2%} of " \
            "max(|U|, 1)" in record.message
        assert f"starting over from theta_0 at step 0 with lr = {lr * 10**(i + 1):.3g} " \
            f"({i + 1} of 2 warmer tries)" in record.message
    assert sum(r.status == "ok" for r in history) == STEPS // WINDOW  # a whole run after


def test_the_tries_stop_at_retry():
    """From 1e-4 the rule wants two decades; with retry=1 the run goes on from 1e-3."""
    assert weak(1e-3)
    history = loop(1e-4, retry=1).run().history
    assert [r.status for r in history[:2]] == ["failed", "ok"]
    assert history[1].hparams["lr"] == pytest.approx(1e-3, rel=1e-12)


def test_the_retried_run_continues_as_a_fresh_run_from_the_value_reached():
    assert_goes_on_as(loop(1e-4).run(), loop(1e-2, retry=0).run())


def hot_lr() -> float:
    """A rate above ``2 / L`` whose window ends hot but not broken (``U + HOT max(U, 1) < L
    <= U + 0.5 max(U, 1)``) and whose tenth is neither, from the closed form."""
    limit = stable_limit()
    for factor in (1.02, 1.04, 1.06, 1.08, 1.1, 1.15, 1.2):
        val, untrained = first_window(limit * factor)
        scale = max(untrained, 1.0)
        if untrained + HOT * scale < val <= untrained + 0.5 * scale:
            return limit * factor
    raise AssertionError("no hot rate near the stability limit")


def test_a_hot_start_above_the_stability_limit_starts_over_a_decade_cooler():
    lr = hot_lr()
    assert not weak(lr / 10) and first_window(lr / 10)[0] < first_window(lr)[1]
    history = loop(lr).run().history
    assert [r.status for r in history[:2]] == ["failed", "ok"]
    assert "hot start: the first window's validation loss" in history[0].message
    assert f"with lr = {lr / 10:.3g} (1 of 2 cooler tries)" in history[0].message
    assert history[1].hparams["lr"] == pytest.approx(lr / 10, rel=1e-12)
    assert "rescue" not in history[0].message and "broken" not in history[0].message


@pytest.mark.parametrize("lr", [0.5, 0.05])
def test_a_healthy_start_runs_exactly_as_without_the_rule(lr):
    val, untrained = first_window(lr)
    assert not weak(lr) and val <= untrained + HOT * max(untrained, 1.0)
    assert lr < stable_limit()
    assert_same_run(loop(lr).run(), loop(lr, retry=0).run())


@pytest.mark.parametrize("stop", [1, 2, 3, 5])
def test_a_resumed_retry_repeats_the_straight_run_bit_for_bit(stop, tmp_path):
    """Stopped after the first try, the second, the first ok window, a later one; saved to a
    run directory's checkpoint and loaded into a fresh loop."""
    whole = loop(1e-4).run()
    first = loop(1e-4)
    for _ in range(stop):
        first.step()
    rundir = RunDir(tmp_path)
    rundir.save_checkpoint(first.state_dict())
    second = loop(1e-4)
    second.load_state_dict(rundir.load_checkpoint())
    assert second.plan.retries == min(stop, 2)
    assert_same_run(second.run(), whole)


@pytest.mark.parametrize("retries", [3, -1, 1.0, "2"])
def test_a_damaged_retry_count_is_refused(retries):
    first = loop(1e-4)
    for _ in range(3):
        first.step()
    state = {**first.state_dict(), "retries": retries}
    with pytest.raises(hd.HyperdiffError, match="retries"):
        loop(1e-4).load_state_dict(state)


def test_no_warmer_try_beyond_the_constraint():
    """lr in (1e-5, 5e-4): from 1e-4 the next decade would leave it, so the run goes on."""
    from dataclasses import replace

    prob = replace(problem(1e-4), hparams=hd.HyperParameters(
        lr=hd.scalar(1e-4, (1e-5, 5e-4)), wd=hd.scalar(WD)))
    opt = HyperOptimizer(prob, plan=OnlinePlan(window=WINDOW, retry=2), method="reverse",
                         optimizer="adam", lr=0.1)
    assert opt.run().history[0].status == "ok"


def test_start_verdict_at_its_margins():
    # U = 2, pace 20: weak where (2 - L) 20 < 0.1 * 2, L > 1.99; hot where L > 2 + 0.05 * 2
    assert start_verdict(1.991, 2.0, 1.0, 20) == 1 and start_verdict(1.989, 2.0, 1.0, 20) == 0
    assert start_verdict(1.991, 2.0, -1.0, 20) == 0  # the hypergradient asks for less
    # a run twice as long per window (pace 10) must remove twice as much: weak above 1.98
    assert start_verdict(1.985, 2.0, 1.0, 20) == 0 and start_verdict(1.985, 2.0, 1.0, 10) == 1
    assert start_verdict(1.981, 2.0, 1.0, 10) == 1 and start_verdict(1.979, 2.0, 1.0, 10) == 0
    assert start_verdict(2.101, 2.0, -1.0, 20) == -1 and start_verdict(2.099, 2.0, -1.0, 20) == 0
    assert start_verdict(2.101, 2.0, 1.0, 20) == 1  # asks for more: weak, not hot
    # U = 0.4: the scale is max(|U|, 1) = 1; weak above 0.4 - 0.1 / 20 = 0.395
    assert start_verdict(0.396, 0.4, 1.0, 20) == 1 and start_verdict(0.394, 0.4, 1.0, 20) == 0
    assert start_verdict(0.451, 0.4, -1.0, 20) == -1 and start_verdict(0.449, 0.4, -1.0, 20) == 0
    assert start_verdict(float("nan"), 0.4, 1.0, 20) == 0


def test_an_old_run_directory_reads_without_the_retries():
    stored = {"outer": {"mode": "online", "window_growth": 0.2, "beta1": 0.5,
                        "explore_when": "broken", "rescue": 3}}
    assert legacy_values(stored)["outer"]["retry"] == 0
    assert load_config().outer.retry == 2
    assert load_config(overrides=["outer.retry=0"]).outer.retry == 0


def stub(retries: int = 0, rescues: int = 0):
    """An online run and loop at a try's first window of ``problem(1e-4)`` (span 0..4)."""
    from types import SimpleNamespace

    prob = problem(1e-4)
    run = SimpleNamespace(problem=prob, retry=2, retries=retries, rescues=rescues,
                          span=(0, WINDOW), pending_retry=None)
    return run, SimpleNamespace(raw=dict(prob.hparams.raw), history=[])


@pytest.mark.parametrize(("verdict", "retries", "rescues", "tries"), [
    (1, 0, 0, True), (1, 1, 0, True), (1, 2, 0, False),  # at most retry = 2
    (-1, 1, 0, False), (1, -1, 0, False),  # one way
    (1, 0, 1, False), (-1, 0, 1, True),  # never warmer after the rescue's cut
])
def test_the_tries_go_one_way_and_never_warmer_after_a_rescue(verdict, retries, rescues, tries):
    from hyperdiff.tuner.online_retry import check_start

    run, loop_stub = stub(retries, rescues)
    untrained = {"validation": 2.0}
    # weak: L just under U, the descent step raises lr; hot: L 10% above U, it lowers lr
    val, grad = (1.999, -1.0) if verdict > 0 else (2.2, 1.0)
    grads = {"lr": torch.tensor(grad, dtype=DT), "wd": torch.tensor(0.0, dtype=DT)}
    if tries:
        with pytest.raises(hd.NonFiniteError, match="weak start" if verdict > 0 else "hot"):
            check_start(run, loop_stub, val, grads, lambda: untrained)
        expected = 1e-4 * 10.0**verdict
        assert float(problem(1e-4).hparams.with_raw(run.pending_retry).natural()["lr"]) == \
            pytest.approx(expected, rel=1e-12)
    else:
        check_start(run, loop_stub, val, grads, lambda: untrained)
        assert run.pending_retry is None


def poisoned(lr: float, fails=lambda lr: lr > 5e-3) -> hd.Problem:
    """problem(lr) with one batch per step whose training loss is NaN from step WINDOW on
    wherever ``fails(lr)``: every window after the first fails at such a rate, whatever the
    outer step."""
    x, y = data(0)
    batches = [(x, y, torch.tensor(t >= WINDOW)) for t in range(STEPS)]

    def train(p, h, b):
        x, y, late = b
        value = ((x @ p["w"] - y) ** 2).mean() + h["wd"] * p["w"].square().sum()
        return torch.where(late & fails(h["lr"]), torch.full_like(value, float("nan")), value)

    hp = hd.HyperParameters(lr=hd.scalar(lr), wd=hd.scalar(WD))
    return hd.make_problem(train, loss, hp, {"w": torch.zeros(D, dtype=DT)},
                           optimizer=hd.sgd("lr"), train_data=batches, val_data=data(1),
                           steps=STEPS, probe=False)


def test_a_window_that_fails_at_the_values_the_warmer_tries_set_names_them():
    """From 1e-4 two warmer tries set 1e-2, whose first window is fine and whose later windows
    fail at 1e-2 itself: the guard gives up naming the tries, not the outer step size."""
    opt = HyperOptimizer(poisoned(1e-4), plan=OnlinePlan(window=WINDOW, retry=2),
                         method="reverse", optimizer="adam", lr=0.1)
    with pytest.raises(hd.NonFiniteError) as err:
        opt.run()
    message = str(err.value)
    assert "5 outer steps in a row failed" in message
    assert f"The window of steps {WINDOW}..{2 * WINDOW - 1} failed at the last good step's " \
        "values themselves (lr=0.01, wd=0.001), which a smaller outer step does not change; " \
        "lr = 0.01 was set by 2 warmer tries of a weak start from 0.0001 (OnlinePlan(retry=" \
        "...) = 2). Start from a learning rate between 0.0001 and 0.01, or set retry=0 to " \
        "keep 0.0001" in message
    assert "Lower the outer learning rate" not in message
    history = opt.history
    assert [r.status for r in history] == ["failed", "failed", "ok"] + ["failed"] * 5
    assert history[3].hparams["lr"] != pytest.approx(1e-2)  # after the outer step
    assert [r.hparams["lr"] for r in history[4:]] == pytest.approx([1e-2] * 4, rel=1e-12)


def test_a_window_stuck_at_its_own_start_values_advises_safer_values():
    opt = HyperOptimizer(poisoned(1e-2), plan=OnlinePlan(window=WINDOW, retry=0),
                         method="reverse", optimizer="adam", lr=0.1)
    with pytest.raises(hd.NonFiniteError, match=r"failed at the last good step's values "
                       r"themselves \(lr=0.01, wd=0.001\), which a smaller outer step does not "
                       r"change. Start from safer values \(e.g. a smaller learning rate\)$"):
        opt.run()


def test_a_guard_that_gives_up_on_moved_values_still_advises_a_smaller_outer_step():
    """Offline a failed step is followed by the restored good values, which train here: a
    give-up at values an outer step moved is one with max_failures=1 (s41: the start's lr is
    0.010000000000000004, so the old `lr != 1e-2` failed every step, the start included)."""
    opt = HyperOptimizer(poisoned(1e-2, fails=lambda lr: (lr - 1e-2).abs() > 1e-5),
                         method="reverse", optimizer="adam", lr=0.1, max_failures=1)
    with pytest.raises(hd.NonFiniteError, match="1 outer steps in a row failed .* Lower the "
                       "outer learning rate") as err:
        opt.run()
    assert "themselves" not in str(err.value)
