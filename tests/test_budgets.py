"""Budgets that fit the user: the still-moving warning at the end of an offline run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.plans import build
from hyperdiff.app.run_inputs import starting_at
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


def test_a_run_that_stopped_early_does_not_say_it_is_still_moving(tmp_path):
    # the early-stopped run's values moved as much as a warned run's, but more steps would not
    # help and `--resume --set stop.max_steps` (the warning's remedy) is refused for it
    config = load_config(overrides=[*SETTINGS[:3], "stop.patience=1", "stop.max_steps=30",
                                    "outer.lr=0.5"])
    result = run_experiment(config, out=tmp_path / "run", log=quiet, progress=False)
    assert result["stop_reason"].startswith("early stopping")
    assert still_moving(RunDir(tmp_path / "run").read_history()) is not None
    assert not [w for w in result.get("warnings", []) if w.startswith("still moving")]


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
    [recorded] = manifest["extensions"]  # with the config it replaced (s39: a stop between
    before = recorded.pop("config_sha256_before")  # the extension's writes takes it back)
    assert [recorded] == extended["extensions"] and len(before) == 64
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


# ------------------------------------------------------------------ --from: start at another run's values
def test_from_starts_a_new_run_at_the_tuned_raw_values_of_another(tmp_path):
    source = run_experiment(load_config(overrides=[*SETTINGS, "stop.max_steps=3",
                                                   "outer.lr=0.5"]),
                            out=tmp_path / "source", log=quiet, progress=False)
    best = torch.load(tmp_path / "source" / "checkpoint.pt", weights_only=False)["best"]["raw"]
    config = load_config(overrides=[*SETTINGS, "stop.max_steps=2"])
    new = run_experiment(config, out=tmp_path / "new", start_from=tmp_path / "source",
                         log=quiet, progress=False)
    started = json.loads((tmp_path / "new" / "manifest.json").read_text())["start_from"]
    assert started["run"] == str(tmp_path / "source")
    for name, value in best.items():  # the raw values, exactly
        assert torch.equal(torch.tensor(started["raw"][name], dtype=torch.float64), value)
    assert new["initial"]["hparams"] == source["tuned"]["hparams"]
    assert RunDir(tmp_path / "new").read_history()[0].hparams == source["tuned"]["hparams"]
    # a resume of the new run keeps its start (the report's initial values)
    assert run_experiment(None, resume=tmp_path / "new", log=quiet)["initial"] == new["initial"]


def test_from_a_run_of_another_task_or_unfinished_is_refused(tmp_path):
    run_experiment(load_config(overrides=[*SETTINGS, "stop.max_steps=2"]),
                   out=tmp_path / "ridge", log=quiet, progress=False)
    other = load_config(overrides=["task.name=logistic_cancer", "stop.max_steps=2"])
    with pytest.raises(HyperdiffError, match=r"--from must name a run of task "
                                             r"'logistic_cancer' \(got .*ridge_diabetes"):
        run_experiment(other, out=tmp_path / "new", start_from=tmp_path / "ridge", log=quiet)
    assert not (tmp_path / "new" / "history.jsonl").exists()
    with pytest.raises(HyperdiffError, match="--from must be given for a new run only"):
        run_experiment(None, resume=tmp_path / "ridge", start_from=tmp_path / "ridge", log=quiet)


def test_from_a_run_with_other_hyperparameters_is_refused(tmp_path):
    run_experiment(load_config(overrides=[*SETTINGS, "stop.max_steps=2"]),
                   out=tmp_path / "ridge", log=quiet, progress=False)
    start = {"run": "R", "raw": {"lam": -1.0},
             "hparams": {"lam": {"kind": "scalar", "constraint": "identity", "size": 1,
                                 "coordinates": ["lam"]}}}
    task, _ = build(load_config(overrides=[*SETTINGS]))
    with pytest.raises(HyperdiffError, match=r"same hyperparameters .* R differs in \['lam'\]"):
        starting_at(task, start)


# ------------------------------------------------------------------ a diverged run keeps its best step
def exploding_after(good: int):
    """A method whose first ``good`` steps succeed and every later one diverges."""
    from test_driver import flaky

    return flaky(set(range(good, 1000)))


@pytest.mark.parametrize("good", [0, 2])
def test_a_run_whose_guard_gives_up_keeps_its_best_step_for_from(tmp_path, monkeypatch, good):
    """The guard gives up after 2 failures: the result names the best step among the good
    ones (its values as the history's record of it) and ``--from`` starts at its raw values,
    exactly; with no good step there is nothing to keep and ``--from`` says so."""
    from hyperdiff.errors import NonFiniteError
    from hyperdiff.methods import registry

    monkeypatch.setitem(registry.METHODS, "exploding", f"test_budgets:exploding_{good}")
    config = load_config(overrides=[*SETTINGS, "stop.max_steps=6", "outer.lr=0.5",
                                    "method.name=exploding", "guard.max_failures=2",
                                    "outer.explore=0"])  # no global phase after a failed start
    messages: list[str] = []
    with pytest.raises(NonFiniteError):
        run_experiment(config, out=tmp_path / "source", log=messages.append, progress=False)
    result = json.loads((tmp_path / "source" / "result.json").read_text())
    history = RunDir(tmp_path / "source").read_history()
    assert result["status"] == "diverged"
    assert [r.status for r in history] == ["ok"] * good + ["failed"] * (2 if good else 1)
    new = load_config(overrides=[*SETTINGS, "stop.max_steps=1"])
    if not good:
        assert "best_step" not in result
        with pytest.raises(HyperdiffError, match=r"--from must name a run with a good step "
                                                 r"\(got .*source, which diverged before"):
            run_experiment(new, out=tmp_path / "new", start_from=tmp_path / "source",
                           log=quiet)
        return
    best = min((r for r in history if r.status == "ok"), key=lambda r: r.selection_loss)
    assert result["best_step"] == best.step and result["best_values"] == best.hparams
    assert result["best_loss"] == best.selection_loss
    assert any(f"--from {tmp_path / 'source'}" in m for m in messages)
    raw = torch.load(tmp_path / "source" / "checkpoint.pt", weights_only=False)["best"]["raw"]
    run_experiment(new, out=tmp_path / "new", start_from=tmp_path / "source", log=quiet,
                   progress=False)
    started = json.loads((tmp_path / "new" / "manifest.json").read_text())["start_from"]
    for name, value in raw.items():
        assert torch.equal(torch.tensor(started["raw"][name], dtype=torch.float64), value)


def exploding_0():
    return exploding_after(0)


def exploding_2():
    return exploding_after(2)
