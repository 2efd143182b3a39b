"""The benchmarks that compare online runs on chosen training seeds: benchmarks/online_matched.py
trains its "same order" references on the seed the online run trained with (``outer.train_seed``
when given; it used the problem's own seed, so a run on another seed was compared with another
minibatch order), and benchmarks/online_seed_means.py's summary against numbers worked by hand.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """A benchmark script as a module (its folder and the suite tasks' on the path)."""
    for folder in (BENCH / "suite_tasks", BENCH):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_matched_references_train_on_the_online_runs_seed(monkeypatch):
    matched = load("online_matched")
    seen = []

    def plain_losses(task, raw, seeds):
        seen.append(tuple(seeds))
        return {"val": 0.0, "test": 0.0}

    monkeypatch.setattr(matched, "plain_losses", plain_losses)
    ref = f"{BENCH / 'suite_tasks' / 'logistic_wide'}.py:build"
    row = matched.matched_row(ref, "outer.train_seed=7 inner.steps=10")
    assert row["online_seed"] == 7
    same_order = [s for s in seen if len(s) == 1]
    assert same_order == [(7,), (7,)]  # the start's values and the final values


def test_seed_means_summary_against_hand_worked_ratios():
    means = load("online_seed_means")

    def row(task, config, loss, cpu, lr_free):
        return {"task": task, "start": "x1", "config": config, "test_loss": loss,
                "cpu_s": cpu, "best_lr_free": lr_free}

    rows = [row("a", "", 2.0, 1.0, 1.5), row("b", "", 0.5, 1.0, 0.9),
            row("a", "x=1", 1.0, 2.0, 1.5), row("b", "x=1", 1.0, 8.0, 0.9)]
    base, other = means.summary(rows, ["", "x=1"])
    assert base["geo_mean_ratio"] == pytest.approx(1.0)
    assert (base["better"], base["at_or_below_lr_free"]) == (0, 1)  # 0.5 <= 0.9 only
    # ratios 1.0 / 2.0 = 0.5 and 1.0 / 0.5 = 2: geometric mean 1; CPU 2 and 8: 4
    assert other["geo_mean_ratio"] == pytest.approx(1.0)
    assert other["cpu_geo_mean_ratio"] == pytest.approx(4.0)
    assert (other["better"], other["rows"], other["at_or_below_lr_free"]) == (1, 2, 1)


def test_the_length_benchmark_times_both_trainings_at_the_same_length(monkeypatch):
    """benchmarks/online_cost_length.py: the plain training and the online run both train the
    asked steps (the online run's own config, the plain one's problem), and the ratios are
    online over plain."""
    bench = load("online_cost_length")
    seen = {}
    build_online, trained_params = bench.build_online, bench.trained_params

    def online(config):
        seen["online"] = config.inner.steps
        return build_online(config)

    def plain(problem, raw, *, seed):
        seen["plain"] = problem.steps
        return trained_params(problem, raw, seed=seed)

    monkeypatch.setattr(bench, "build_online", online)
    monkeypatch.setattr(bench, "trained_params", plain)
    row = bench.measure("logistic_wide", 12, 1)
    assert seen == {"online": 12, "plain": 12} and row["steps"] == 12 and row["windows"] >= 1
    assert row["cpu_ratio"] == pytest.approx(row["online_cpu_s"] / row["plain_cpu_s"])
