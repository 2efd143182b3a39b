"""``hyperdiff compare``: table, figure and JSON on a tiny budget."""

from __future__ import annotations

import json

from hyperdiff import search
from hyperdiff.cli import COMMANDS, main


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


def test_compare_refuses_cross_validation(tmp_path, capsys):
    status, _ = run_compare(tmp_path, "--set", "task.cv_folds=3")
    assert status == 2
    assert "task.cv_folds must be 0" in capsys.readouterr().err
