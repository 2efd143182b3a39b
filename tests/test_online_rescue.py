"""The online rescue of a broken start (:mod:`hyperdiff.tuner.online_rescue`) on a least-squares
problem whose stability limit is known in closed form: full-batch gradient descent on
``mean((X w - y)^2)`` (Hessian ``H = 2 X^T X / n``) diverges for ``lr > 2 / L``, ``L`` the
largest eigenvalue of ``H``. From a start ``lr_0`` the rescued run trains at ``lr_0 / 10^j``
with ``j`` the first decade below ``2 / L``; its tries are in the history; it continues as a
fresh run from that value; resume anywhere repeats it bit for bit; a run whose every try is
unstable ends with one error naming them; a stable start runs exactly as without the rescue."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.config import legacy_values, load_config
from hyperdiff.app.rundir import RunDir
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.online_rescue import broken_window
from hyperdiff.tuner.plans import OnlinePlan

DT = torch.float64
N, D, STEPS, WINDOW = 32, 4, 30, 5


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``X`` with orthogonal columns of squared norms ``n s`` (s = 1, 0.5, 0.25, 0.1) and
    ``y = X w* + noise``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, D, generator=g, dtype=DT))
    x = math.sqrt(N) * q * torch.tensor([1.0, 0.5, 0.25, 0.1], dtype=DT).sqrt()
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT) + 0.1 * torch.randn(N, generator=g,
                                                                              dtype=DT)
    return x, y


def loss(p, h, batch):
    x, y = batch
    return ((x @ p["w"] - y) ** 2).mean()


def problem(lr: float) -> hd.Problem:
    hp = hd.HyperParameters(lr=hd.scalar(lr), wd=hd.scalar(1e-3))
    return hd.make_problem(lambda p, h, b: loss(p, h, b) + h["wd"] * p["w"].square().sum(),
                           loss, hp, {"w": torch.zeros(D, dtype=DT)}, optimizer=hd.sgd("lr"),
                           train_data=data(0), val_data=data(1), steps=STEPS, probe=False)


def loop(lr: float, rescue: int = 3, **options) -> HyperOptimizer:
    return HyperOptimizer(problem(lr), plan=OnlinePlan(window=WINDOW, rescue=rescue),
                          method="reverse", optimizer="adam", lr=0.1, **options)


def stable_limit() -> float:
    """``2 / L`` from the eigenvalues of the training loss's Hessian (the weight decay adds
    ``2 wd``)."""
    x, _ = data(0)
    hessian = 2.0 * x.T @ x / N + 2e-3 * torch.eye(D, dtype=DT)
    return 2.0 / float(torch.linalg.eigvalsh(hessian).max())


def first_stable_decade(lr: float) -> int:
    return next(j for j in range(10) if lr / 10**j < stable_limit())


@pytest.mark.parametrize("lr", [0.5, 5.0, 30.0, 400.0])
def test_the_rescued_run_trains_at_the_first_stable_decade_with_its_tries_recorded(lr):
    j = first_stable_decade(lr)
    assert j == {0.5: 0, 5.0: 1, 30.0: 2, 400.0: 3}[lr]  # the cases are those they say
    history = loop(lr).run().history
    tries, first_ok = history[:j], history[j]
    assert [r.status for r in tries] == ["failed"] * j and first_ok.status == "ok"
    assert [r.hparams["lr"] for r in history[:j + 1]] == pytest.approx(
        [lr / 10**i for i in range(j + 1)], rel=1e-12)
    assert all("broken start" in r.message and f"steps 0..{WINDOW - 1} trained): starting "
               f"over from theta_0 at step 0 with lr = {lr / 10**(i + 1):.3g}" in r.message
               for i, r in enumerate(tries))
    assert [r.step for r in history] == list(range(len(history)))
    assert sum(r.status == "ok" for r in history) == STEPS // WINDOW  # a whole run after


def assert_goes_on_as(tried, fresh) -> None:
    """The ok windows of a run after its tries are ``fresh``'s run, up to rounding."""
    ok = [r for r in tried.history if r.status == "ok"]
    assert len(ok) == len(fresh.history)
    for mine, theirs in zip(ok, fresh.history, strict=True):
        assert mine.hparams == pytest.approx(theirs.hparams, rel=1e-9)
        assert mine.val_loss == pytest.approx(theirs.val_loss, rel=1e-9)
    assert torch.allclose(tried.params["w"], fresh.params["w"], rtol=1e-9, atol=0)


def test_the_rescued_run_continues_as_a_fresh_run_from_the_cut_value():
    assert_goes_on_as(loop(30.0).run(), loop(30.0 / 100, rescue=0).run())


def assert_same_run(mine, theirs) -> None:
    """Two online results with the same records (timing aside), model and final values."""
    assert [r.without_timing() for r in mine.history] == \
        [r.without_timing() for r in theirs.history]
    assert torch.equal(mine.params["w"], theirs.params["w"])
    assert torch.equal(mine.final_raw["lr"], theirs.final_raw["lr"])


@pytest.mark.parametrize("lr", [0.5, 0.05])
def test_a_stable_start_runs_exactly_as_without_the_rescue(lr):
    assert_same_run(loop(lr).run(), loop(lr, rescue=0).run())


@pytest.mark.parametrize("stop", [1, 2, 3, 5])
def test_a_resumed_rescue_repeats_the_straight_run_bit_for_bit(stop, tmp_path):
    """Stopped after the first try, the second, the first ok window, a later one; saved to a
    run directory's checkpoint and loaded into a fresh loop."""
    whole = loop(30.0).run()
    first = loop(30.0)
    for _ in range(stop):
        first.step()
    rundir = RunDir(tmp_path)
    rundir.save_checkpoint(first.state_dict())
    second = loop(30.0)
    second.load_state_dict(rundir.load_checkpoint())
    assert second.plan.rescues == min(stop, 2)
    assert_same_run(second.run(), whole)


def test_a_damaged_rescue_count_is_refused():
    first = loop(30.0)
    for _ in range(3):
        first.step()
    state = {**first.state_dict(), "rescues": 1}
    with pytest.raises(hd.HyperdiffError, match="rescues"):
        loop(30.0).load_state_dict(state)


def test_every_try_unstable_ends_with_one_error_naming_them():
    assert first_stable_decade(3000.0) == 4  # one decade more than three cuts reach
    opt = loop(3000.0)
    with pytest.raises(hd.NonFiniteError) as err:
        opt.run()
    message = str(err.value)
    assert "the start failed at each of its 4 tries, with lr = 3e+03, 300, 30, 3" in message
    assert "broken start" in message  # the last try's reason
    assert [r.status for r in opt.history] == ["failed"] * 4
    assert opt.history[-1].message == message


def test_a_cut_below_the_constraint_ends_the_run_with_the_tries_named():
    """lr in (1, 100) from 30: 3 is unstable too (2 / L ~ 1), and 0.3 is outside."""
    prob = replace(problem(30.0), hparams=hd.HyperParameters(lr=hd.scalar(30.0, (1.0, 100.0)),
                                                             wd=hd.scalar(1e-3)))
    opt = HyperOptimizer(prob, plan=OnlinePlan(window=WINDOW, rescue=3), method="reverse")
    with pytest.raises(hd.NonFiniteError, match=r"2 tries, with lr = 30, 3 .*lr cannot be cut "
                       r"10x within its constraint"):
        opt.run()
    assert [r.status for r in opt.history] == ["failed", "failed"]


def test_without_the_rescue_the_guard_refuses_the_start_as_before():
    with pytest.raises(hd.NonFiniteError, match="Start from safer values than lr=30"):
        loop(30.0, rescue=0).run()


def test_no_rescue_when_the_learning_rate_is_not_a_hyperparameter():
    fixed = hd.make_problem(loss, loss, hd.HyperParameters(wd=hd.scalar(1e-3)),
                            {"w": torch.zeros(D, dtype=DT)}, optimizer=hd.sgd(30.0),
                            train_data=data(0), val_data=data(1), steps=STEPS, probe=False)
    opt = HyperOptimizer(fixed, plan=OnlinePlan(window=WINDOW, rescue=3), method="reverse")
    with pytest.raises(hd.NonFiniteError, match="Start from safer values"):
        opt.run()


def test_broken_window_against_its_margin_and_the_chaotic_ratio():
    # U = 2: broken above 2 + 0.5 * 2 = 3; U = 0.4: above 0.4 + 0.5 * 1 = 0.9
    assert broken_window(3.0, 1.0, 2.0) == "" and broken_window(3.01, 1.0, 2.0) != ""
    assert broken_window(0.9, 1.0, 0.4) == "" and broken_window(0.91, 1.0, 0.4) != ""
    assert broken_window(math.nan, 1.0, 0.4) != "" and broken_window(math.inf, 1.0, 0.4) != ""
    # chaotic: norm above 1e3 x max(|L|, 1)
    assert broken_window(2.0, 2000.0, 2.0) == "" and "chaotic" in broken_window(2.0, 2001.0, 2.0)
    assert "chaotic" in broken_window(0.5, 1001.0, 2.0) and broken_window(0.5, 1000.0, 2.0) == ""


def test_invalid_rescue_values_are_refused():
    with pytest.raises(hd.HyperdiffError, match=r"rescue must be a non-negative int"):
        OnlinePlan(rescue=-1)


def test_the_tries_do_not_count_toward_the_guards_failures_in_a_row():
    """A try is not a failed outer step: 4 tries end in the rescue's own error, not the
    guard's, even with max_failures=2, and no try cuts the outer learning rate."""
    with pytest.raises(hd.NonFiniteError, match=r"the start failed at each of its 4 tries"):
        loop(3e4, rescue=3, max_failures=2).run()


def test_an_old_run_directory_reads_without_the_rescue():
    stored = {"outer": {"mode": "online", "window_growth": 0.2, "beta1": 0.5,
                        "explore_when": "broken"}}
    assert legacy_values(stored)["outer"]["rescue"] == 0
    assert load_config().outer.rescue == 3


SHAPES = str(Path(__file__).resolve().parents[1] / "benchmarks" / "suite_tasks" /
             "shapes_cnn.py:build_lr_x100")
CLI = [f"task.name={SHAPES}", "outer.mode=online", "report.seeds=1"]


def test_the_cli_rescues_the_suite_start_that_it_refused_and_resumes_across_the_tries(tmp_path):
    """shapes_cnn from 100x its learning rate (the suite's refused start: validation loss
    1.34e8, then 4.66e3 from 10x): two cuts; its own start at the problem's seed then ends its
    first window at 2.78, 20% above the untrained model's 2.32, and the default ``outer.retry``
    (tuner/online_retry.py) starts it over a decade cooler; a run interrupted after the first
    try resumes to the same records."""
    from interrupt import interrupted_run

    from hyperdiff.app.experiment import run_experiment

    whole = run_experiment(load_config(overrides=CLI), out=tmp_path / "a", log=lambda _: None,
                           progress=False)
    history = RunDir(tmp_path / "a").read_history()
    assert [r.status for r in history[:4]] == ["failed", "failed", "failed", "ok"]
    assert [r.hparams["lr_peak"] for r in history[:4]] == pytest.approx(
        [5.0, 0.5, 0.05, 0.005], rel=1e-6)
    assert ["broken start" in r.message for r in history[:3]] == [True, True, False]
    assert "hot start: the first window's validation loss 2.78" in history[2].message
    interrupted_run(tmp_path / "b", CLI, at=1)
    resumed = run_experiment(None, resume=tmp_path / "b", log=lambda _: None, progress=False)
    again = RunDir(tmp_path / "b").read_history()
    assert [r.without_timing() for r in again] == [r.without_timing() for r in history]
    assert resumed["tuned"] == whole["tuned"]
