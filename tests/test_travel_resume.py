"""``stop.travel`` through ``hyperdiff run``: a run directory interrupted before, inside and
after the steps the rule waits for resumes to the history of the run that never stopped."""

from __future__ import annotations

import pytest
from interrupt import interrupted_run
from test_resume import histories as history
from test_resume import quiet

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment

SETTINGS = ["output.checkpoint_seconds=0", "task.name=mlp_digits", "inner.steps=10",
            "stop.max_steps=14", "stop.patience=2", "outer.explore=0", "report.seeds=1"]
"""A short run whose early stopping the rule holds back: with ``stop.travel = 0`` it stops
after 12 steps, with the default 3 after 13 (a value still travels where it would stop)."""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("travel") / "straight"
    result = run_experiment(load_config(overrides=SETTINGS), out=out, log=quiet, progress=False)
    return out, result


def test_the_rule_holds_this_run_back(straight, tmp_path):
    _, result = straight
    plain = run_experiment(load_config(overrides=[*SETTINGS, "stop.travel=0"]),
                           out=tmp_path / "plain", log=quiet, progress=False)
    assert (plain["steps"], result["steps"]) == (12, 13)
    assert plain["stop_reason"] == result["stop_reason"] == (
        "early stopping: no better selection loss for 2 steps")


@pytest.mark.parametrize("at", [4, 12])
def test_an_interrupted_run_resumes_to_the_same_history(straight, tmp_path, at):
    out = tmp_path / "interrupted"
    interrupted_run(out, SETTINGS, at=at)
    assert len(history(out)) == at
    run_experiment(None, resume=out, log=quiet, progress=False)
    assert history(out) == history(straight[0])
