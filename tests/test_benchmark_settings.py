"""Benchmark scripts run the settings their docs and recorded results name, not today's defaults.

benchmarks/horizon.py's offline rows are documented (and were recorded) with Adam; after
signstep became ``HyperOptimizer``'s default they silently ran signstep until the script named
its optimizer (found by the rerun after the one-loop refactor, docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import json
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


def _suite_part(methods, rows, plain_s, outer_step_s=None):
    """A ``suite.py`` result of one task (``logistic_wide``) run with ``--methods methods``."""
    settings = {"tasks": ["logistic_wide"], "tpe_trials": 100, "starts": [], "methods": methods,
                "start_modes": ["offline", "online"], "max_steps": None, "offline_set": [],
                "steps_factor": 1.0, "seed": 0}
    untuned = {"method": "untuned start", "start": "x1", "test_loss": 0.064,
               "test_accuracy": 0.97, "trainings": 0, "time_s": 0.0, "time_ratio": 0.0}
    block = {"task": "logistic_wide", "reference": "r", "description": "d", "hparams": 501,
             "steps": 100, "plain_training_s": plain_s, "outer_step_s": outer_step_s,
             "outer_step_ratio": None if outer_step_s is None else outer_step_s / plain_s,
             "outer_step_paired": None, "rows": [untuned, *rows]}
    return {"mode": "full", "settings": settings, "total_time_s": 1.0, "threads": 1,
            "load_average_before": [1.0, 1.0, 1.0], "load_average_after": [1.0, 1.0, 1.0],
            "tasks": {"logistic_wide": block}, "summary": {}, "online_vs_lr_free": {}}


def _ran(method, loss, time_s, plain_s):
    return {"method": method, "start": "x1", "test_loss": loss, "test_accuracy": 0.9,
            "trainings": 1, "time_s": time_s, "time_ratio": time_s / plain_s}


def test_suite_merge_combines_the_rows_of_parts_split_by_methods(tmp_path, capsys):
    """``suite.py --merge`` of one task's parts run with other ``--methods`` kept the last
    part's block only (the lr grid's row vanished under ``settings.methods = ['lr-grid']``);
    ``--out`` in a new folder raised FileNotFoundError."""
    suite = load("suite")
    grid = _suite_part(["lr-grid"], [_ran("lr grid", 0.11, 0.15, 0.030)], 0.030)
    free = _suite_part(["lr-free"], [_ran("prodigy", 0.16, 0.42, 0.028),
                                     _ran("d-adapt adam", 0.40, 0.04, 0.028)], 0.028)
    out = tmp_path / "new" / "merged.json"
    suite.merge([free, grid], out)
    merged = json.loads(out.read_text())
    rows = merged["tasks"]["logistic_wide"]["rows"]
    assert [r["method"] for r in rows] == ["untuned start", "lr grid", "prodigy", "d-adapt adam"]
    assert [r.get("plain_training_s") for r in rows[1:]] == [0.030, 0.028, 0.028]
    assert merged["settings"]["methods"] == ["lr-grid", "lr-free"]
    assert merged["settings"]["tasks"] == ["logistic_wide"]
    assert {"lr grid", "prodigy", "d-adapt adam"} <= set(merged["summary"])
    assert merged["summary"]["lr grid"]["wins"] == 0 and merged["summary"]["untuned start"]["wins"]
    with pytest.raises(SystemExit, match="parts 1 and 3 both have the row 'lr grid' of task "
                                         "logistic_wide"):
        suite.merge([grid, free, grid], tmp_path / "twice.json")
    assert not (tmp_path / "twice.json").exists()


def test_outer_step_timings_of_mlp_digits_time_gradient_steps(monkeypatch):
    """mlp_digits starts weak: a default offline run's steps 1-8 are the global phase's plain
    points (no hypergradient). The benchmarks that time its outer steps (outer_step_cost.py,
    logging_overhead.py, distributed.py, rundir_overhead.py, suite.py's paired step) timed
    those points; their configs turn the phase off."""
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build

    configs = {"outer_step_cost": load("outer_step_cost").config_for("mlp_digits", 3),
               "logging_overhead": load_config(
                   overrides=load("logging_overhead").CASES["mlp_digits (offline)"])}
    for name, config in configs.items():
        assert config.outer.explore == 0, name
        _, loop = build(config)
        records = [loop.step(), loop.step()]
        assert all(r.grad is not None for r in records), name

    import hyperdiff.tuner.driver as driver

    seen = {}

    def stand_in(problems, **kwargs):
        seen.update(kwargs)
        raise BuiltError

    monkeypatch.setattr(driver, "HyperOptimizer", stand_in)
    with pytest.raises(BuiltError):
        load("distributed").outer_steps({"inner_steps": 5, "outer_steps": 2})
    assert seen["plan"].explore == 0 and seen["plan"].samples == 4 and "samples" not in seen


def test_outer_step_cost_update_replaces_one_task_and_repeats_are_not_overridden(
        monkeypatch, tmp_path):
    """``--tasks mlp_digits --update`` refreshes that block and keeps the file's others;
    ``--quick`` no longer overrides ``--repeats``."""
    bench = load("outer_step_cost")
    head = {"repeats": 3, "torch": "t", "threads": 1, "machine": "m"}
    old = {**head, "tasks": [{"task": "mlp_digits", "v": 1}, {"task": "gru_seq", "v": 2}]}
    new = bench.updated(old, {**head, "tasks": [{"task": "mlp_digits", "v": 3}]})
    assert new["tasks"] == [{"task": "mlp_digits", "v": 3}, {"task": "gru_seq", "v": 2}]
    with pytest.raises(SystemExit, match="repeats 2 against 3"):
        bench.updated(old, {**head, "repeats": 2, "tasks": []})

    seen = []

    def measure(name, ref, repeats, workdir):
        seen.append(repeats)
        raise BuiltError

    monkeypatch.setattr(bench, "measure_task", measure)
    for argv, repeats in ((["--quick", "--repeats", "1"], 1), (["--quick"], 2), ([], 3)):
        monkeypatch.setattr(sys, "argv", ["outer_step_cost.py", *argv,
                                          "--out", str(tmp_path / "o.json")])
        with pytest.raises(BuiltError):
            bench.main()
        assert seen[-1] == repeats


@pytest.mark.filterwarnings("ignore:finite_difference")  # its CostWarning: 30 trainings
def test_online_segments_default_methods_all_run():
    """The default methods included ``implicit``, which an online window of mlp_digits refuses
    (its hyperparameters act through the optimizer alone): both documented commands crashed."""
    bench = load("online_segments")
    assert "implicit" not in bench.METHODS
    for method in bench.METHODS:
        seconds, windows = bench.time_method(method, steps=10, window=10)
        assert windows == 1 and seconds > 0, method


@pytest.mark.parametrize("name, tiny", [
    ("implicit_bias", {"CASES": [("ridge_diabetes", 5)]}),
    ("forward_memory", {"ENGINES": ("jvp",), "KS": (1,), "STEPS": (3,)}),
    ("reversible_momentum", {"STEPS": (5,)}),
    ("implicit_preconditioners", None),  # about 20 s: --help only
])
def test_scripts_take_help_and_out(name, tiny, monkeypatch, tmp_path, capsys):
    """These scripts had no argument parser: ``--help`` and ``--out`` were ignored, the whole
    benchmark ran and overwrote its file in benchmarks/results/."""
    bench = load(name)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0 and "--out" in capsys.readouterr().out
    if tiny is None:
        return
    for key, value in tiny.items():
        monkeypatch.setattr(bench, key, value)
    before = Path(bench.RESULTS).stat().st_mtime_ns
    bench.main(["--out", str(tmp_path / "sub" / "r.json")])
    assert json.loads((tmp_path / "sub" / "r.json").read_text())
    assert Path(bench.RESULTS).stat().st_mtime_ns == before


def test_blackbox_trials_given_win_over_quick(monkeypatch, tmp_path):
    """``--quick --trials 3`` ran 10 trials (``--quick`` replaced ``--trials`` silently)."""
    bench = load("blackbox")
    seen = []

    def run_task(name, trials, quick):
        seen.append(trials)
        raise BuiltError

    monkeypatch.setattr(bench, "run_task", run_task)
    for argv, trials in ((["--quick", "--trials", "3"], 3), (["--quick"], 10), ([], 200)):
        monkeypatch.setattr(sys, "argv", ["blackbox.py", *argv, "--out", str(tmp_path / "b")])
        with pytest.raises(BuiltError):
            bench.main()
        assert seen[-1] == trials


def test_discrete_no_search_reads_the_stored_run_beside_the_script(monkeypatch, tmp_path,
                                                                   capsys):
    """``--no-search`` read benchmarks/results/discrete.json from the working directory (a
    FileNotFoundError after every mode had run); with ``--quick`` it compared T=40 runs with
    the stored T=100 target."""
    bench = load("discrete")
    ran = []

    def run_mode(mode, seed, steps, quick, start, outer_lr):
        ran.append(mode)
        return {"curve": {"trainings": [1, 2], "time_s": [0.1, 0.2], "test_loss": [0.5, 0.4]},
                "stop_reason": "max_steps", "initial_test_loss": 0.6, "choices": {},
                "relaxation_gap": {"gap": {}}}

    monkeypatch.setattr(bench, "run_mode", run_mode)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "d.json"
    monkeypatch.setattr(sys, "argv", ["discrete.py", "--quick", "--no-search", "--out", str(out)])
    with pytest.raises(SystemExit):
        bench.main()
    assert "T=100" in capsys.readouterr().err and not ran
    monkeypatch.setattr(sys, "argv", ["discrete.py", "--no-search", "--starts", "default",
                                      "--out", str(out)])
    bench.main()
    stored = json.loads((BENCH / "results" / "discrete.json").read_text())
    assert json.loads(out.read_text())["target_test_loss"] == stored["target_test_loss"]


def test_online_tables_print_skipped_lr_free_rows_with_their_note():
    """A skipped lr-free row printed as nan without its note, and with ``--no-lr-free`` both
    tables printed "best lr-free nan" and a column of nan."""
    defaults, cost = load("online_defaults"), load("online_cost")
    online = [{"start": "x1", "config": "", "test_loss": 0.5, "time_ratio": 2.0,
               "cpu_ratio": 2.1, "windows": 9}]
    note = "prodigyopt is not installed (pip install 'hyperdiff[bench]')"
    lr_free = [{"method": "prodigy", "start": "x1", "skipped": note},
               {"method": "d-adapt adam", "start": "x1", "test_loss": 0.4, "time_ratio": 1.5}]
    base = {"task": "t", "steps": 10, "plain_training_s": 0.1, "plain_training_cpu_s": 0.1,
            "online": online}
    for table in (defaults.table, cost.table):
        some = table({**base, "lr_free": lr_free})
        assert "nan" not in some and note in some and "0.4000 (d-adapt adam)" in some
        assert "1.250" in some  # 0.5 over the best lr-free 0.4
        none = table({**base, "lr_free": []})
        assert "nan" not in none and "best lr-free - (none run)" in none
        skipped = table({**base, "lr_free": lr_free[:1]})
        assert "nan" not in skipped and "best lr-free - (all skipped)" in skipped
