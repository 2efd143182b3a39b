"""The head-to-head suite's tasks (benchmarks/suite_tasks/) and the suite's bookkeeping: every
task builds and trains, its splits are disjoint and deterministic for a data seed, the starts
10x / 100x off scale the learning rate, and a missing optional package is a skipped row."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import hyperdiff as hd

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TASK_DIR = BENCH / "suite_tasks"
OWN_SPLITS = ("char_lm", "shapes_cnn", "tabular_mlp", "gru_seq", "logistic_wide")
HOLDOUT = ("tabular_bn_dropout", "regression_stream")


def load(name: str):
    """A suite task file (or the suite script) as a module."""
    for folder in (TASK_DIR, BENCH):  # suite.py and the task files import suite_common
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    path = BENCH / "suite.py" if name == "suite" else TASK_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"test_suite_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def row_set(x: torch.Tensor) -> set[bytes]:
    """The rows of ``x`` as bytes (to compare splits example by example)."""
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


@pytest.mark.parametrize("name", [*OWN_SPLITS, *HOLDOUT])
def test_splits_disjoint_and_deterministic(name):
    module = load(name)
    first, again, other = module.data(0), module.data(0), module.data(1)
    rows = {split: row_set(first[split][0]) for split in ("train", "val", "test")}
    assert not rows["train"] & rows["test"]
    assert not rows["train"] & rows["val"]
    assert not rows["val"] & rows["test"]
    for split in first:
        for a, b in zip(first[split], again[split], strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(first["test"][0], other["test"][0])


@pytest.mark.parametrize("name", [*OWN_SPLITS, "reweight"])
def test_task_builds_and_trains(name):
    task = hd.tasks.build_task(f"{TASK_DIR / name}.py:build", steps=2)
    assert task.final_problem.steps == 2
    test = task.evaluate(seeds=(0,))["test"]
    assert math.isfinite(test["loss"]) and 0.0 <= test["accuracy"] <= 1.0


def test_the_held_out_tasks_build_and_train():
    classifier = hd.tasks.build_task(f"{TASK_DIR / 'tabular_bn_dropout'}.py:build", steps=2)
    test = classifier.evaluate(seeds=(0,))["test"]
    assert math.isfinite(test["loss"]) and 0.0 <= test["accuracy"] <= 1.0
    assert classifier.final_problem.buffers  # BatchNorm's running statistics are carried
    regressor = hd.tasks.build_task(f"{TASK_DIR / 'regression_stream'}.py:build", steps=2)
    assert set(regressor.evaluate(seeds=(0,))["test"]) == {"loss"}  # a regression: no accuracy


def test_the_held_out_regression_target_is_standardized_on_the_training_rows():
    splits = load("regression_stream").data(0)
    y = splits["train"][1].double()
    assert float(y.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(y.std()) == pytest.approx(1.0, abs=1e-6)
    assert [len(splits[k][0]) for k in ("train", "val", "test")] == [48000, 16000, 16000]


def test_the_held_out_tasks_are_not_suite_tasks_and_start_like_them():
    suite = load("suite")
    assert not set(suite.HOLDOUT_TASKS) & set(suite.TASKS)
    assert suite.HOLDOUT_TASKS == HOLDOUT
    for name in HOLDOUT:
        module = load(name)
        base = float(module.build(steps=3).hparams.natural()["lr_peak"])
        assert base == pytest.approx(1e-3)  # the value a user writes first
        x100 = float(module.build_lr_x100(steps=3).hparams.natural()["lr_peak"])
        assert x100 == pytest.approx(100 * base)


def test_a_held_out_result_never_goes_over_the_suites_own():
    suite = load("suite")
    assert suite.result_name(suite.FULL, quick=False) == "suite"
    assert suite.result_name(suite.QUICK, quick=True) == "suite_quick"
    held_out = replace(suite.FULL, tasks=("gru_seq", "regression_stream"))
    assert suite.result_name(held_out, quick=False) == "suite_holdout"
    subset = replace(held_out, methods=("offline", "search"), steps_factor=3.0)
    assert suite.result_name(subset, quick=False) == "suite_holdout_offline_search_steps3"
    assert suite.result_name(replace(suite.QUICK, tasks=suite.HOLDOUT_TASKS),
                             quick=True) == "suite_holdout_quick"


def test_starts_scale_the_learning_rate_only():
    module = load("gru_seq")
    base = module.build(steps=3).hparams.natural()
    for factor in (0.01, 0.1, 10.0, 100.0):
        factory = getattr(module, f"build_lr_x{factor:g}".replace(".", "p"))
        natural = factory(steps=3).hparams.natural()
        assert float(natural["lr_peak"]) == pytest.approx(factor * float(base["lr_peak"]))
        assert float(natural["wd"]) == float(base["wd"])


def test_missing_optional_package_is_a_skipped_row():
    suite = load("suite")
    task = hd.tasks.build_task(f"{TASK_DIR / 'logistic_wide'}.py:build", steps=2)
    missing = suite.LrFree("nothing", "hyperdiff_no_such_package", lambda m, p: None)
    row = suite.lr_free_row(task, missing, plain_s=1.0)
    assert row["method"] == "nothing" and "hyperdiff_no_such_package" in row["skipped"]
    summary = suite.summary([{"rows": [row]}], "tpe-100")
    assert summary["nothing"]["skipped"] == 1 and summary["nothing"]["tasks"] == 0


def test_summary_geometric_mean_and_wins():
    suite = load("suite")

    def r(method, loss):
        return {"method": method, "start": "x1", "test_loss": loss}

    blocks = [{"rows": [r("tpe-100", 0.5), r("a", 0.25), r("b", 1.0)]},
              {"rows": [r("tpe-100", 0.2), r("a", 0.8), r("b", 0.1)]}]
    out = suite.summary(blocks, "tpe-100")
    assert out["a"]["geomean_loss_ratio"] == pytest.approx(math.sqrt(0.5 * 4.0))
    assert out["b"]["geomean_loss_ratio"] == pytest.approx(math.sqrt(2.0 * 0.5))
    assert (out["a"]["wins"], out["b"]["wins"], out["tpe-100"]["wins"]) == (1, 1, 0)
    assert out["a"]["geomean_tasks"] == out["a"]["tasks"] == 2


def test_a_geometric_mean_over_fewer_tasks_than_run_says_so():
    """Where the reference failed on a task, the mean covers the others only: the table said
    "tasks run 2" beside a mean over 1 (until s39)."""
    suite = load("suite")

    def r(method, loss):
        return {"method": method, "start": "x1", "test_loss": loss}

    blocks = [{"rows": [r("tpe-100", 0.5), r("a", 0.25)]},
              {"rows": [r("tpe-100", float("nan")), r("a", 0.8)]}]
    out = suite.summary(blocks, "tpe-100")
    assert out["a"]["tasks"] == 2 and out["a"]["geomean_tasks"] == 1
    assert out["a"]["geomean_loss_ratio"] == pytest.approx(0.5)
    assert "0.500 (over 1)" in suite.summary_table(out)


def test_merging_parts_of_other_settings_is_refused(tmp_path):
    suite = load("suite")
    part = {"mode": "full", "settings": {"seed": 0, "tpe_trials": 100, "tasks": ["a"],
                                         "methods": ["offline"]},
            "tasks": {}, "total_time_s": 1.0, "load_average_before": [0], "load_average_after": [0]}
    other = {**part, "settings": {**part["settings"], "seed": 1, "tasks": ["b"]}}
    with pytest.raises(SystemExit, match="same settings but tasks and methods \\(got other "
                       "seed\\)"):
        suite.merge([part, other], tmp_path / "merged.json")


DIVERGING_TASK = '''
import torch
import hyperdiff as hd

def build(steps=None, data_seed=0):
    x = torch.linspace(-1, 1, 64).reshape(-1, 1)
    def loss(p, h, batch):
        xb, yb = batch
        return ((xb * p["w"] - yb) ** 2).mean()
    return hd.task("diverging", model={"w": torch.zeros(1)}, train_loss=loss, val_loss=loss,
                   hparams=hd.HyperParameters(lr=hd.scalar(1e30)), optimizer=hd.sgd("lr"),
                   data=(x, 3 * x), steps=steps or 5, batch_size=None, probe=False)
'''


def test_a_run_that_diverges_at_the_start_is_a_row_with_a_note(tmp_path):
    suite = load("suite")
    path = tmp_path / "diverging.py"
    path.write_text(DIVERGING_TASK)
    row, steps = suite.hyperdiff_row(f"{path}:build", "offline", suite.QUICK, 1.0, "x100",
                                     tmp_path / "runs")
    assert row["method"] == "hd offline" and row["start"] == "x100"
    assert row["test_loss"] is None and row["note"].startswith("failed: ")
    assert "diverged" in row["note"] and steps == []


def online_run(seed, loss, own, time_s, failed=False):
    """One online run's row as ``hyperdiff_row`` returns it (failed: no metrics, a note)."""
    if failed:
        return {"method": "hd online", "start": "x1", "test_loss": None, "test_accuracy": None,
                "time_s": time_s, "train_seed": seed, "note": "failed: diverged"}
    return {"method": "hd online", "start": "x1", "test_loss": loss, "test_accuracy": 0.5,
            "time_s": time_s, "train_seed": seed, "tuned": {"lr": seed},
            "online_model_test": {"loss": own, "accuracy": 0.25}}


def test_an_online_row_is_the_mean_over_its_training_seeds():
    suite = load("suite")
    out = suite.seed_mean([online_run(1, 0.3, 1.0, 2.0), online_run(2, 0.6, 2.0, 4.0),
                           online_run(3, 0.9, 6.0, 9.0)])
    assert out["test_loss"] == pytest.approx(0.6) and out["test_accuracy"] == pytest.approx(0.5)
    assert out["online_model_test"] == pytest.approx({"loss": 3.0, "accuracy": 0.25})
    # sample sd of 1, 2, 6: mean 3, squares 4 + 1 + 9 = 14 over 2
    assert out["online_model_test_sd"]["loss"] == pytest.approx(math.sqrt(7.0))
    assert out["time_s"] == pytest.approx(5.0) and out["tuned"] == {"lr": 1}
    assert [p["train_seed"] for p in out["per_seed"]] == [1, 2, 3]
    assert "note" not in out and "train_seed" not in out


def test_the_paired_time_ratio_is_the_median_of_each_run_over_its_own_plain_training():
    suite = load("suite")
    runs = [online_run(1, 0.3, 1.0, 2.0), online_run(2, 0.6, 2.0, 4.0),
            online_run(3, 0.9, 6.0, 9.0)]
    assert "time_ratio_paired" not in suite.seed_mean(runs)  # no plain training beside them
    paired = [{**r, "paired_plain_s": s} for r, s in zip(runs, (1.0, 1.0, 3.0), strict=True)]
    out = suite.seed_mean(paired)
    assert out["time_ratio_paired"] == pytest.approx(3.0)  # 2 / 1, 4 / 1, 9 / 3: median 3
    assert [p["paired_plain_s"] for p in out["per_seed"]] == [1.0, 1.0, 3.0]


def test_a_failed_seed_is_left_out_of_the_means_and_named():
    suite = load("suite")
    out = suite.seed_mean([online_run(1, 0.0, 0.0, 1.0, failed=True),
                           online_run(2, 0.2, 1.0, 2.0), online_run(3, 0.4, 3.0, 6.0)])
    assert out["test_loss"] == pytest.approx(0.3)
    assert out["online_model_test"]["loss"] == pytest.approx(2.0)
    assert out["time_s"] == pytest.approx(3.0)  # what the three runs cost
    assert out["note"] == ("failed on train seed(s) 1, mean over the other 2: "
                           "failed: diverged")
    everything_failed = suite.seed_mean([online_run(s, 0, 0, 1.0, failed=True)
                                         for s in (1, 2)])
    assert everything_failed["test_loss"] is None
    assert everything_failed["note"] == "failed: diverged"


def test_online_against_lr_free_counts_tasks_at_or_below_the_best():
    suite = load("suite")

    def r(method, loss, own=None, start="x1"):
        extra = {} if own is None else {"online_model_test": {"loss": own}}
        return {"method": method, "start": start, "test_loss": loss, **extra}

    blocks = [{"task": "a", "rows": [r("hd online", 9.0, 0.5), r("prodigy", 0.5),
                                     r("d-adapt adam", 0.7), r("hd online", 1.0, 0.6, "lr x10")]},
              {"task": "b", "rows": [r("hd online", 0.1, 0.9), r("schedulefree adamw", 0.8),
                                     r("hd online", None, None, "lr x10")]},
              {"task": "c", "rows": [r("hd online", 0.1, 0.1)]}]  # no lr-free row: left out
    out = suite.online_vs_lr_free(blocks)
    assert out["hd online"] == {"at_or_below": ["a"], "above": ["b"], "failed": []}
    assert out["hd online (lr x10)"] == {"at_or_below": [], "above": ["a"], "failed": ["b"]}
    assert "online own model" in suite.online_table(blocks)


MINIBATCH_TASK = '''
import torch
import hyperdiff as hd

def build(steps=None, data_seed=0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(96, generator=g)
    def loss(p, h, batch):
        xb, yb = batch
        return ((xb @ p["w"] - yb) ** 2).mean()
    return hd.task("minibatch", model={"w": torch.zeros(3)}, train_loss=loss, val_loss=loss,
                   hparams=hd.HyperParameters(lr=hd.scalar(0.05)), optimizer=hd.sgd("lr"),
                   data=(x, y), steps=steps or 12, batch_size=4, probe=False)
'''


def test_the_interleaved_outer_step_is_steps_of_the_default_offline_loop(tmp_path):
    suite = load("suite")
    path = tmp_path / "minibatch.py"
    path.write_text(MINIBATCH_TASK)
    out = suite.outer_step_paired(f"{path}:build", repeats=2)
    assert set(out) == {"plain_s", "outer_step_s", "ratio"}
    assert out["plain_s"] > 0 and out["outer_step_s"] > 0
    assert out["ratio"] == out["outer_step_s"] / out["plain_s"]


def test_the_online_row_trains_once_on_each_report_seed(tmp_path):
    suite = load("suite")
    path = tmp_path / "minibatch.py"
    path.write_text(MINIBATCH_TASK)
    ref = f"{path}:build"
    out = suite.online_row(ref, suite.QUICK, 1.0, "x1", tmp_path / "runs",
                           hd.tasks.build_task(ref))
    per_seed = out["per_seed"]
    assert [p["train_seed"] for p in per_seed] == list(suite.SEEDS)
    own = [p["online_model_test"]["loss"] for p in per_seed]
    assert len(set(own)) == 3  # three minibatch orders, three models
    assert out["online_model_test"]["loss"] == pytest.approx(sum(own) / 3, rel=1e-12)
    assert out["test_loss"] == pytest.approx(sum(p["test_loss"] for p in per_seed) / 3)
    ratios = sorted(p["time_s"] / p["paired_plain_s"] for p in per_seed)
    assert out["time_ratio_paired"] == pytest.approx(ratios[1], rel=1e-12)  # their median


def test_a_steps_factor_trains_every_hyperdiff_row_that_many_times_longer(tmp_path, monkeypatch):
    """``--steps-factor``: the task's own T (12 here) times the factor, in the run's config
    (``inner.steps``) of the offline, online and interleaved-step rows; 1 keeps the task's."""
    suite = load("suite")
    path = tmp_path / "minibatch.py"
    path.write_text(MINIBATCH_TASK)
    ref = f"{path}:build"
    assert suite.run_steps(ref, 1.0) is None and suite.run_steps(ref, 2.5) == 30
    seen = []
    run_experiment = suite.run_experiment

    def recorded(config, **kwargs):
        seen.append(config.inner.steps)
        return run_experiment(config, **kwargs)

    monkeypatch.setattr(suite, "run_experiment", recorded)
    settings = suite.replace(suite.QUICK, max_steps=2, steps_factor=2.5)
    suite.hyperdiff_row(ref, "offline", settings, 1.0, "x1", tmp_path / "off", steps=30)
    suite.online_row(ref, settings, 1.0, "x1", tmp_path / "on",
                     hd.tasks.build_task(ref, steps=30), steps=30)
    assert seen == [30, 30, 30, 30]
    built = []
    build = suite.build
    monkeypatch.setattr(suite, "build", lambda config: built.append(config.inner.steps)
                        or build(config))
    suite.outer_step_paired(ref, repeats=1, steps=30)
    assert built == [30]
