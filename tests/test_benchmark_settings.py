"""Benchmark scripts run the settings their docs and recorded results name, not today's defaults.

benchmarks/horizon.py's offline rows are documented (and were recorded) with Adam; after
signstep became ``HyperOptimizer``'s default they silently ran signstep until the script named
its optimizer (found by the rerun after the one-loop refactor, docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass of the script looks its module up there
    spec.loader.exec_module(module)
    return module


class BuiltError(Exception):
    """Raised by the stand-in driver once it has seen its arguments."""


def test_horizon_offline_rows_run_adam_as_documented(monkeypatch):
    horizon = load("horizon")
    seen = {}

    def driver(problems, **kwargs):
        seen.update(kwargs)
        raise BuiltError

    monkeypatch.setattr(horizon, "HyperOptimizer", driver)
    with pytest.raises(BuiltError):
        horizon.offline_row(10, 100, None, 1.0, ())
    assert seen["optimizer"] == "adam" and seen["lr"] == 0.05 and seen["method"] == "reverse"
    assert "Adam" in horizon.__doc__.split("(a) offline")[1].split("(b)")[0]


def test_horizon_online_rows_give_hot_start_to_the_plan(monkeypatch):
    """benchmarks/horizon_starts.py's ``hot_start=warn`` rows passed ``hot_start`` to
    ``HyperOptimizer`` (a TypeError since the one loop: it is the online plan's option)."""
    horizon = load("horizon")
    seen = {}

    def driver(problem, *, plan, **kwargs):
        seen.update(kwargs, plan=plan)
        raise BuiltError

    monkeypatch.setattr(horizon, "HyperOptimizer", driver)
    monkeypatch.setattr(horizon, "plain_time", lambda task: 1.0)
    task = horizon.build_task("horizon_digits", steps=20)
    with pytest.raises(BuiltError):
        horizon.online_row(task, "x", 0.1, (), window=5, method="curvature", horizon=10,
                           hot_start="warn")
    assert seen["plan"].hot_start == "warn" and "hot_start" not in seen


def test_suite_seed_reaches_the_offline_rows_and_the_searches(monkeypatch, tmp_path):
    """``suite.py --seed S`` runs hd offline at ``outer.seed = S`` and seeds every search with
    ``S``; seed 0 adds no key, so the published rows' configs are unchanged."""
    from dataclasses import replace

    suite = load("suite")
    seen: dict[str, list] = {"outer_seed": [], "overrides": [], "searches": []}

    def run(config, **kwargs):
        seen["outer_seed"].append(config.outer.seed)
        raise BuiltError

    real_load = suite.load_config

    def load_config(overrides):
        seen["overrides"].append(list(overrides))
        return real_load(overrides=overrides)

    monkeypatch.setattr(suite, "load_config", load_config)
    monkeypatch.setattr(suite, "run_experiment", run)
    for seed in (0, 3):
        with pytest.raises(BuiltError):
            suite.hyperdiff_row("reweight_digits", "offline", replace(suite.FULL, seed=seed),
                                1.0, "x1", tmp_path)
    assert seen["outer_seed"] == [0, 3]
    assert not any(o.startswith("outer.seed") for o in seen["overrides"][0])

    def search(task, method, budget, *, seed=0):
        seen["searches"].append((method, seed))
        return suite.SearchResult(method, ())

    monkeypatch.setattr(suite, "timed_search", search)
    monkeypatch.setattr(suite, "tpe_search", lambda task, trials, *, seed: search(
        task, "tpe-fixed", trials, seed=seed))
    monkeypatch.setattr(suite, "search_row", lambda task, result, plain_s: {})
    monkeypatch.setattr(suite, "optuna_available", lambda: True)
    suite.search_rows(None, replace(suite.FULL, seed=5), 1.0, 1.0, lambda _m: None)
    assert seen["searches"] == [("tpe", 5), ("random", 5), ("tpe-fixed", 5)]


def test_the_fixed_batch_benchmark_runs_fixed_batch_tasks_under_both_rules():
    """benchmarks/online_fixed_batch.py compares the curvature scale's two rules on tasks whose
    every step reads the same rows: each of its tasks (and every start) must be one, and each
    run must ask for the rule it is labelled with."""
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build_online

    script = load("online_fixed_batch")
    for task in script.TASKS:
        for start in script.SUITE_STARTS:
            config = load_config(overrides=[f"task.name={script.reference(task, start)}",
                                            "outer.mode=online"])
            _, loop = build_online(config)
            assert loop.plan.problem.train_data.fixed_batch, (task, start)
            assert config.method.options == {"curvature_scale": "auto"}
    assert set(script.RULES) == {"rows", "auto"}


def test_the_global_phase_benchmark_compares_plain_points_with_the_old_rule():
    """``hypergradient_points()`` brings back the points' hypergradients (the old rule) and
    only inside its block, so the script's two rows differ by that alone."""
    from test_driver import ridge_problem

    from hyperdiff.tuner.driver import HyperOptimizer, Stopping
    from hyperdiff.tuner.offline_plan import OfflinePlan

    bench = load("global_phase_cost")

    def grads():
        problem, _ = ridge_problem(lam=0.05)
        loop = HyperOptimizer(problem, lr=0.3, stopping=Stopping(max_steps=5, patience=None),
                              plan=OfflinePlan(explore=2, explore_when="always"))
        return [r.grad is not None for r in loop.run().history]

    with bench.hypergradient_points():
        assert grads() == [True] * 5
    assert grads() == [True, False, False, True, True]


def test_the_confirm_chaotic_rows_differ_in_that_key_only():
    """The benchmark's two runs of a row: the defaults, ``outer.confirm_chaotic`` 0 and 2."""
    from hyperdiff.app.config import load_config

    bench = load("confirm_chaotic")
    off, on = (load_config(overrides=bench.overrides("ridge_diabetes", 5, 3, c)) for c in (0, 2))
    assert (off.outer.confirm_chaotic, on.outer.confirm_chaotic) == (0, 2)
    assert off.inner.steps == on.inner.steps == 5 and off.outer.seed == 3
    default = load_config(overrides=["task.name=ridge_diabetes", "inner.steps=5",
                                     "outer.seed=3"])
    assert on == default
