"""The hot-start measure and restart of online runs (:mod:`hyperdiff.tuner.hot_start`): its
optimization times against sums written out, its ratio against the quotient computed by hand,
and the built-in full-length task: restarted (or warned) from 10x too large a start, untouched
from its own; resume across the restart bit for bit."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from test_online import recipe

import hyperdiff as hd
from hyperdiff.app.tasks import build_task
from hyperdiff.engine.training import initial_state
from hyperdiff.tuner import hot_start
from hyperdiff.tuner.hot_start import cooled, hot_start_ratio, optimization_time

# the deprecated shim is what these tests exercise (they predate the one loop)
pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

DT = torch.float64


def test_optimization_time_is_the_sum_of_the_learning_rates():
    steps = 30
    sched = hd.schedule("warmup_cosine", steps)
    hp = hd.HyperParameters(**sched.hyperparameters(peak=0.4, warmup=0.2, final=0.1))
    prob = recipe(steps)
    prob = replace(prob, hparams=hp, optimizer=hd.sgd(sched, 0.5))
    values = {n: float(v) for n, v in hp.natural().items()}
    natural = {n: torch.tensor(v, dtype=DT) for n, v in values.items()}
    expected = sum(float(sched.value(natural, t)) for t in range(4, 17))
    assert optimization_time(prob, values, 4, 17) == pytest.approx(expected, rel=1e-12)
    scalar = recipe(steps)  # lr is the scalar hyperparameter "lr"
    assert optimization_time(scalar, {"lr": 0.3, "momentum": 0.6, "wd": 0.01}, 2, 12) == \
        pytest.approx(3.0, rel=1e-12)
    constant = replace(scalar, optimizer=hd.sgd(0.1))
    assert optimization_time(constant, {}, 0, 5) is None  # a number: nothing tuned


def test_ratio_is_the_trained_over_the_tuned_optimization_time():
    """Windows of 2 steps at lr 0.9, 0.6, 0.3 (a failed one between them, discarded), values
    0.2 after them: (0.9 + 0.6 + 0.3) * 2 / (0.2 * 6) = 3 at step M = 6 (30% of 20 steps)."""
    prob = recipe(20)
    tuner = hd.online.OnlineTuner(prob, window=2, lr=0.0)
    records = [tuner.step() for _ in range(4)]
    made = [replace(records[0], hparams={**records[0].hparams, "lr": 0.9}),
            replace(records[1], hparams={**records[1].hparams, "lr": 5.0}, status="failed"),
            replace(records[1], step=2, hparams={**records[1].hparams, "lr": 0.6}),
            replace(records[2], step=3, hparams={**records[2].hparams, "lr": 0.3}),
            replace(records[3], step=4, hparams={**records[3].hparams, "lr": 0.2})]
    assert hot_start_ratio(prob, made, 2, fraction=0.3) == (6, pytest.approx(3.0, rel=1e-12))
    # no record after the window yet: the current values stand in
    current = {**records[3].hparams, "lr": 0.9}
    assert hot_start_ratio(prob, made[:4], 2, current, fraction=0.3) == \
        (6, pytest.approx(3.6 / 5.4, rel=1e-12))
    assert hot_start_ratio(prob, made[:2], 2, fraction=0.3) is None  # not at M yet
    # values held fixed (outer lr 0): the ratio is exactly 1
    fixed = [tuner.step() for _ in range(6)]
    assert hot_start_ratio(prob, records + fixed, 2)[1] == pytest.approx(1.0, rel=1e-12)


OPTIONS = {"window": 20, "method": "curvature", "horizon": 20.0, "horizon_unit": "lr",
           "optimizer": "sgd", "normalize": True, "lr": 0.2, "schedule": "cosine"}


def full_length(peak, **options):
    """The built-in 2000-step task's problem from ``peak`` and its default online tuner."""
    task = build_task("horizon_digits", steps=2000)
    problem = task.problems[0]
    problem = replace(problem, hparams=problem.hparams.with_natural(lr_peak=peak))
    return problem, hd.online.OnlineTuner(problem, **{**OPTIONS, **options})


def test_cooled_divides_the_peak_or_the_scalar_learning_rate():
    problem, _ = full_length(0.5)
    natural = problem.hparams.natural()
    out = problem.hparams.with_raw(cooled(problem, problem.hparams.raw, 4.0)).natural()
    assert float(out["lr_peak"]) == pytest.approx(0.125, rel=1e-12)
    assert all(torch.equal(out[n], natural[n]) for n in natural if n != "lr_peak")
    scalar = recipe(6)
    out = scalar.hparams.with_raw(cooled(scalar, scalar.hparams.raw, 2.0)).natural()
    assert float(out["lr"]) == pytest.approx(0.15, rel=1e-12)
    assert float(out["momentum"]) == pytest.approx(0.6, rel=1e-12)


def test_a_hot_start_restarts_from_theta_0_cooler_and_warn_mode_only_warns(caplog):
    """From 10x too large a peak the first 10% (200 steps) train 3.4x the optimization time
    that the values by then give: the default restarts from theta_0 at step 0 with those values
    and lr_peak divided by the ratio; "warn" goes on with them; from the task's start (ratio
    1.03) nothing happens (benchmarks/horizon_starts.py)."""
    problem, restart = full_length(0.5)
    _, warn = full_length(0.5, hot_start="warn")
    with caplog.at_level(logging.WARNING, logger="hyperdiff.online"):
        for _ in range(10):  # windows to step 200 = M
            restart.step()
            warn.step()
    (steps, ratio), measured = restart.hot_start_measure, warn.hot_start_measure
    assert steps == 200 and ratio == pytest.approx(3.40, abs=0.005) and measured == (steps, ratio)
    assert restart.restarted and not warn.restarted and restart.inner_step == 0
    assert warn.inner_step == 200
    theta_0 = initial_state(problem, differentiable=False).params
    assert all(torch.equal(restart.state.params[k], v) for k, v in theta_0.items())
    assert restart.tangent is None
    cool, found = restart.hparams.natural(restart.raw), warn.hparams.natural(warn.raw)
    assert float(cool["lr_peak"]) * ratio == pytest.approx(float(found["lr_peak"]), rel=1e-6)
    assert all(torch.equal(cool[n], found[n]) for n in found if n != "lr_peak")
    assert "restarted from theta_0" in restart.warnings[0]
    assert "rerun from a smaller" in warn.warnings[0]
    assert restart.history[-1].message == restart.warnings[0]
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"OnlineTuner: {restart.warnings[0]}", f"OnlineTuner: {warn.warnings[0]}"]
    record = restart.step()  # the second pass trains steps 0..19 again, and is not measured
    assert restart.inner_step == 20
    assert record.hparams["lr_peak"] == pytest.approx(float(cool["lr_peak"]), rel=1e-6)
    _, calm = full_length(0.05)
    for _ in range(11):
        calm.step()
    assert calm.hot_start_measure[1] < 2.0 and calm.warnings == () and not calm.restarted


def test_a_run_resumed_after_its_restart_continues_bit_for_bit():
    _, whole = full_length(0.5)
    for _ in range(13):
        whole.step()
    _, first = full_length(0.5)
    for _ in range(11):
        first.step()
    _, resumed = full_length(0.5)
    resumed.load_state_dict(first.state_dict())
    assert resumed.restarted and resumed.hot_start_measure == first.hot_start_measure
    for _ in range(2):
        resumed.step()
    assert [r.without_timing() for r in resumed.history] == \
        [r.without_timing() for r in whole.history]
    assert all(torch.equal(resumed.state.params[k], v) for k, v in whole.state.params.items())
    assert torch.equal(resumed.flat, whole.flat) and resumed.warnings == whole.warnings


def test_no_restart_when_the_measuring_window_ends_the_run(monkeypatch):
    """Windows 0..9, 10..109 and 110..1114 (K = 10 growing by 9 t; the last 5 steps join the
    third): the third window, the first measured (MIN_WINDOWS), reaches 10% of the run (step
    112) and ends it; above the limit (lowered to 1 here: this run's ratio is 1.04) it is
    warned, with nothing to restart. The ratio is the trained optimization time over the found
    one, summed from the records: lr is a scalar, so each window's is lr x its steps."""
    monkeypatch.setattr(hot_start, "LIMIT", 1.0)
    prob = recipe(1115)
    loop = hd.HyperOptimizer(prob, plan=hd.plans.OnlinePlan(window=10, growth=9.0,
                                                            hot_start="restart"),
                             method=hd.truncated(1), optimizer="sgd", normalize=True, lr=0.5)
    result = loop.run()
    assert loop.plan.done and loop.plan.inner_step == 1115 and not loop.plan.restarted
    assert [r.status for r in result.history] == ["ok"] * 3
    used = [r.hparams["lr"] for r in result.history]
    trained = used[0] * 10 + used[1] * 100 + used[2] * 1005
    found = float(result.final_hparams.natural()["lr"]) * 1115
    assert loop.plan.hot_start_measure == (1115, pytest.approx(trained / found, rel=1e-9))
    assert trained / found > 1.0
    assert "the run ended with that window" in loop.plan.warnings[0]


@pytest.mark.parametrize(("steps", "measured"), [(20, False), (30, True)])
def test_a_run_is_measured_from_its_third_window_on(steps, measured):
    """With K = 1 the 10% point of 20 steps is reached in the second window: one outer step
    from the start is no measure of a hot start (tuner/hot_start.py's MIN_WINDOWS); of 30 steps
    in the third, which is measured."""
    tuner = hd.online.OnlineTuner(recipe(steps), window=1, optimizer="sgd", normalize=True,
                                  lr=2.0, hot_start="warn")
    for _ in range(3):
        tuner.step()
    assert (tuner.hot_start_measure is not None) == measured


def test_the_report_table_prints_the_run_warnings():
    from test_online_report import table_result

    from hyperdiff.app.experiment import format_table

    result = table_result()
    assert "warning:" not in format_table(result)
    table = format_table({**result, "warnings": ["it started hot", "second"]})
    assert [line for line in table.splitlines() if line.startswith("warning: ")] == \
        ["warning: it started hot", "warning: second"]


def test_the_restart_is_the_default_of_the_long_horizon_method_only():
    """Greedy windows lower the learning rate from any start (their short-horizon bias): with
    them a falling value is no sign of a hot start, and nothing is measured by default."""
    assert hd.online.OnlineTuner(recipe(6)).hot_start == "ignore"
    assert hd.online.OnlineTuner(recipe(6), method="forward").hot_start == "ignore"
    assert full_length(0.05)[1].hot_start == "restart"
    assert hd.online.OnlineTuner(recipe(6), hot_start="warn").hot_start == "warn"
    with pytest.raises(hd.HyperdiffError, match="hot_start must be None or one of"):
        hd.online.OnlineTuner(recipe(6), hot_start="always")


HOT = ["task.name=horizon_digits", "inner.steps=200", "outer.window=5", "outer.lr=3.0",
       "outer.lowering=1", "report.seeds=1"]
# outer steps of 3 in L2, kept whole where they lower the lr (the online default keeps a fifth
# of those): the lr falls 5.4x in the first 20 steps


def test_the_cli_run_restarts_reports_it_and_resumes_across_the_restart(tmp_path):
    from interrupt import interrupted_run

    from hyperdiff.app.config import load_config
    from hyperdiff.app.experiment import format_table, run_experiment
    from hyperdiff.app.rundir import RunDir

    def log(_: str) -> None:
        return None

    whole = run_experiment(load_config(overrides=HOT), out=tmp_path / "a", log=log,
                           progress=False)
    assert "restarted from theta_0" in whole["warnings"][0]
    # at outer lr 3 the run's own model also ends worse than the untuned start (its own warning)
    assert all(w.startswith("the run's own model ends worse") for w in whole["warnings"][1:])
    assert f"warning: {whole['warnings'][0]}" in format_table(whole).splitlines()
    history = RunDir(tmp_path / "a").read_history()
    assert len(history) == 4 + 40  # 4 windows to step 20, then the whole run again
    assert history[3].message == whole["warnings"][0]
    interrupted_run(tmp_path / "b", HOT, at=7)  # stopped after the restart
    resumed = run_experiment(None, resume=tmp_path / "b", log=log, progress=False)
    again = RunDir(tmp_path / "b").read_history()
    assert [r.without_timing() for r in again] == [r.without_timing() for r in history]
    assert resumed["tuned"] == whole["tuned"] and resumed["warnings"] == whole["warnings"]
