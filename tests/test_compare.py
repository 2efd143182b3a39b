"""``hyperdiff compare``: table, figure and JSON on a tiny budget."""

from __future__ import annotations

import json

import pytest

from hyperdiff.app import search
from hyperdiff.app.cli import COMMANDS, main


def run_compare(tmp_path, *extra):
    out = tmp_path / "cmp"
    argv = ["compare", "--task", "ridge_diabetes", "--set", "inner.steps=20",
            "--set", "stop.max_steps=3", "--set", "report.seeds=1", "--quiet",
            "--out", str(out), *extra]
    return main(argv), out


def test_compare_writes_table_figure_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(search, "optuna_available", lambda: False)
    status, out = run_compare(tmp_path, "--budget", "2")
    assert status == 0 and "compare" in COMMANDS
    text = capsys.readouterr().out
    assert "hyperdiff" in text and "random" in text and "tpe" not in text.split("skipped")[0]
    assert "skipped: tpe: optuna not installed" in text
    assert (out / "comparison.png").stat().st_size > 1000
    report = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in report["methods"]}
    assert rows["hyperdiff"]["trainings"] == 3 and rows["random"]["trainings"] == 2
    for row in rows.values():
        assert row["best_val_loss"] == min(row["curve"]["best"])
        assert row["winner_metrics"]["test"]["loss"] > 0


def test_compare_budget_defaults_to_hyperdiff_trainings(tmp_path, capsys):
    status, out = run_compare(tmp_path, "--no-tpe")
    assert status == 0
    report = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in report["methods"]] == ["hyperdiff", "random"]
    assert report["budget"] == report["methods"][0]["trainings"] == 3


def test_compare_with_cross_validation_scores_every_method_by_the_cv_loss(tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr(search, "optuna_available", lambda: False)
    status, out = run_compare(tmp_path, "--set", "task.cv_folds=3")
    assert status == 0
    assert "3 cross-validation folds" in capsys.readouterr().out
    report = json.loads((out / "comparison.json").read_text())
    assert report["objective"] == "outer_loss"
    hyper, rand = report["methods"]
    assert hyper["trainings"] == report["budget"] == 9  # 3 steps x 3 folds
    assert rand["trainings"] == 9 and len(rand["curve"]["trainings"]) == 3  # 3 trials x 3 folds


def test_outer_loss_is_the_mean_validation_loss_of_the_folds():
    """Oracle: the hypergradient's own value (reverse mode) at the same values, per fold."""
    import hyperdiff as hd
    from hyperdiff.app.tasks import build_task

    task = build_task("ridge_diabetes", steps=20, cv_folds=3)
    values = {"lam": 0.3}
    raw = task.hparams.with_natural(**values).raw
    expected = sum(float(hd.reverse()(p, raw).value) for p in task.problems) / 3
    assert task.outer_loss(values) == pytest.approx(expected, rel=1e-12)
    loss, metrics = search.evaluate_trial(task, values, seed=0, objective="outer_loss")
    assert loss == metrics["outer_loss"] == task.outer_loss(values)
    assert search.objective_for(task) == "outer_loss"
    assert search.trainings_per_trial(task, "outer_loss") == 3
