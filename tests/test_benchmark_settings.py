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
