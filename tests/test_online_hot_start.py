"""The hot-start warning of online runs (:mod:`hyperdiff.online.hot_start`): its optimization
times against sums written out, its ratio against the quotient computed by hand, and the
built-in full-length task warned from 10x too large a start and not from its own."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from test_online import recipe

import hyperdiff as hd
from hyperdiff.online.hot_start import hot_start_ratio, hot_start_warning, optimization_time
from hyperdiff.tasks import build_task

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
    tuner = hd.OnlineTuner(prob, window=2, lr=0.0)
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
    assert hot_start_warning(prob, made, 2, fraction=0.3, limit=2.9) is not None
    assert hot_start_warning(prob, made, 2, fraction=0.3, limit=3.1) is None
    # values held fixed (outer lr 0): the ratio is exactly 1
    fixed = [tuner.step() for _ in range(6)]
    assert hot_start_ratio(prob, records + fixed, 2)[1] == pytest.approx(1.0, rel=1e-12)


def test_the_full_length_task_warns_from_a_hot_start_only(caplog):
    """horizon_digits, its default tuner, the first 10% of the run: from 10x too large a peak
    the run trains 3.4x the optimization time its values give those steps; from its start
    0.05, 1.0x (benchmarks/horizon_starts.py)."""
    task = build_task("horizon_digits", steps=2000)
    options = {"window": 20, "method": "curvature", "horizon": 20.0, "horizon_unit": "lr",
               "optimizer": "sgd", "normalize": True, "lr": 0.2, "schedule": "cosine"}
    found = {}
    for peak in (0.05, 0.5):
        problem = task.problems[0]
        problem = replace(problem, hparams=problem.hparams.with_natural(lr_peak=peak))
        tuner = hd.OnlineTuner(problem, **options)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hyperdiff.online"):
            for _ in range(11):  # windows to step 220, past M = 200
                tuner.step()
        found[peak] = (tuner.warnings, [r.getMessage() for r in caplog.records])
    assert found[0.05] == ((), [])
    warnings, logged = found[0.5]
    assert len(warnings) == 1 and "3.4x" in warnings[0]
    assert logged == [f"OnlineTuner: {warnings[0]}"]  # logged once, when the run reached M


def test_the_report_table_prints_the_run_warnings():
    from hyperdiff.experiment import format_table

    side = {"hparams": {"lr": 0.1}, "summary": {}, "metrics": {"test": {"loss": 1.0}}}
    result = {"task": "t", "steps": 1, "time_s": 0.0, "stop_reason": "x", "best_step": 0,
              "criterion": "final values", "sizes": {}, "report_seeds": [0], "run_dir": "r",
              "initial": side, "tuned": side}
    assert "warning:" not in format_table(result)
    table = format_table({**result, "warnings": ["it started hot", "second"]})
    assert [line for line in table.splitlines() if line.startswith("warning: ")] == \
        ["warning: it started hot", "warning: second"]
