"""Budgets that fit the user: the still-moving warning at the end of an offline run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import RunDir
from hyperdiff.errors import HyperdiffError
from hyperdiff.tuner.budget import THRESHOLD, recent_changes, still_moving
from hyperdiff.tuner.history import StepRecord

BASE = StepRecord(0, {}, "ok", 1.0, 1.0, 0.0, None, 1.0, None, None, 0.1, False, 1, "", 0.0, 0.0)


def history(values: list[dict]) -> list[StepRecord]:
    return [replace(BASE, step=s, hparams=v) for s, v in enumerate(values)]


def test_a_value_that_moved_more_than_the_threshold_in_the_last_fifth_warns():
    # 10 steps: the window is max(2, ceil(0.2 * 10)) = 2, from step 7 to step 9
    values = [{"lr": 1.0, "wd": [1.0, 2.0]}] * 7 + [
        {"lr": 1.0, "wd": [1.0, 2.0]}, {"lr": 1.1, "wd": [1.0, 2.1]},
        {"lr": 1.25, "wd": [1.0, 2.1]}]
    window, changes = recent_changes(history(values))
    assert window == 2
    assert changes["lr"] == pytest.approx(0.25)  # |1.25 - 1| / 1
    assert changes["wd"] == pytest.approx(0.05)  # the largest entry's: |2.1 - 2| / 2
    message = still_moving(history(values))
    assert message is not None and "lr changed by 25%" in message and "wd" not in message
    assert "last 2 of 10 outer steps" in message


def test_a_value_that_moved_early_but_settled_does_not_warn():
    # a 100% change in the first steps, then under the threshold in the last 20%
    values = [{"lr": 1.0}, {"lr": 2.0}, {"lr": 3.0}] + [{"lr": 3.0 + 0.01 * s} for s in range(7)]
    assert still_moving(history(values)) is None
    _, changes = recent_changes(history(values))
    assert changes["lr"] < THRESHOLD


def test_a_vector_warns_by_its_largest_entry_and_failed_steps_are_skipped():
    values = [{"w": [1.0, 1.0]}] * 8 + [{"w": [1.0, 1.5]}]
    records = history(values)
    records.insert(8, replace(BASE, step=99, status="failed", hparams={"w": [None, None]}))
    message = still_moving(records)
    assert message is not None and "w changed by 50%" in message
    assert "of 9 outer steps" in message


def test_too_short_a_history_does_not_warn():
    assert still_moving(history([{"lr": 1.0}, {"lr": 5.0}])) is None


SETTINGS = ["task.name=ridge_diabetes", "inner.steps=10", "report.seeds=1", "stop.patience=0"]


def quiet(_: str) -> None:
    return None


@pytest.mark.parametrize(("lr", "warns"), [(0.5, True), (1e-6, False)])
def test_a_real_run_warns_in_its_result_only_when_its_values_still_move(tmp_path, lr, warns):
    config = load_config(overrides=[*SETTINGS, "stop.max_steps=5", f"outer.lr={lr}"])
    messages: list[str] = []
    result = run_experiment(config, out=tmp_path / "run", log=messages.append, progress=False)
    records = RunDir(tmp_path / "run").read_history()
    moving = still_moving(records)
    assert (moving is not None) == warns
    stored = json.loads((tmp_path / "run" / "result.json").read_text())
    found = [w for w in stored.get("warnings", []) if w.startswith("still moving")]
    assert len(found) == warns
    assert [w for w in result.get("warnings", []) if w.startswith("still moving")] == found
    if warns:
        assert f"--resume {tmp_path / 'run'} --set stop.max_steps=10" in found[0]
        assert any(m.startswith("still moving") for m in messages)


# ------------------------------------------------------------------ extending a finished run
EXTEND = ["task.name=mlp_digits", "inner.steps=10", "inner.warm_start=true", "outer.samples=2",
          "report.seeds=1", "stop.patience=0", "outer.schedule=constant"]


def lines(path) -> list[dict]:
    return [record.without_timing() for record in RunDir(path).read_history()]


def test_an_extended_run_continues_as_an_uninterrupted_longer_run(tmp_path):
    longer = run_experiment(load_config(overrides=[*EXTEND, "stop.max_steps=7"]),
                            out=tmp_path / "seven", log=quiet, progress=False)
    run_experiment(load_config(overrides=[*EXTEND, "stop.max_steps=4"]), out=tmp_path / "four",
                   log=quiet, progress=False)
    assert len(lines(tmp_path / "four")) == 4
    extended = run_experiment(None, resume=tmp_path / "four", overrides=("stop.max_steps=7",),
                              log=quiet, progress=False)
    assert lines(tmp_path / "four") == lines(tmp_path / "seven")
    assert extended["steps"] == longer["steps"] == 7
    assert extended["tuned"]["hparams"] == longer["tuned"]["hparams"]
    assert extended["extensions"] == [{"step": 4, "from_max_steps": 4, "to_max_steps": 7}]
    manifest = json.loads((tmp_path / "four" / "manifest.json").read_text())
    assert manifest["extensions"] == extended["extensions"]
    # resuming it again returns its result; the config now says 7
    again = run_experiment(None, resume=tmp_path / "four", log=quiet)
    assert again["steps"] == 7


@pytest.mark.parametrize("steps", [2, 4])
def test_extending_to_a_smaller_or_equal_budget_is_refused(tmp_path, steps):
    run_experiment(load_config(overrides=[*EXTEND, "stop.max_steps=4"]), out=tmp_path / "run",
                   log=quiet, progress=False)
    with pytest.raises(HyperdiffError, match=r"stop.max_steps must be larger than the run's "
                                             rf"budget 4 .*\(got {steps}\)"):
        run_experiment(None, resume=tmp_path / "run", overrides=(f"stop.max_steps={steps}",),
                       log=quiet)
    assert "extensions" not in json.loads((tmp_path / "run" / "result.json").read_text())
