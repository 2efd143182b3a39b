"""``outer.confirm`` and ``stop.extend`` through ``hyperdiff run``: a run directory interrupted
before and after confirmed steps (and inside the budget's extension) resumes to the history of
the run that never stopped."""

from __future__ import annotations

import pytest
from interrupt import interrupted_run
from test_resume import histories as history
from test_resume import quiet

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment

SETTINGS = ["output.checkpoint_seconds=0", "task.name=mlp_digits", "inner.steps=10",
            "stop.max_steps=6", "stop.patience=0", "outer.explore=0", "report.seeds=1",
            "outer.confirm=1", "stop.extend=4", "outer.lr=0.2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("confirm") / "straight"
    result = run_experiment(load_config(overrides=SETTINGS), out=out, log=quiet, progress=False)
    return out, result


def test_this_run_confirms_and_extends(straight):
    out, result = straight
    assert result["stop_reason"] == "budget: 6 outer steps + 2 while a value travelled (stop.extend = 4)"
    # mlp_digits trains 2 samples a step; each new best (steps 0-5) 1 more for its confirmation
    assert [(r["trainings"], r["best"]) for r in history(out)] == [
        *((3 * (s + 1), True) for s in range(6)), (20, False), (22, False)]


@pytest.mark.parametrize("at", [1, 4, 7])
def test_an_interrupted_run_resumes_to_the_same_history(straight, tmp_path, at):
    out = tmp_path / "interrupted"
    interrupted_run(out, SETTINGS, at=at)
    assert len(history(out)) == at
    run_experiment(None, resume=out, log=quiet, progress=False)
    assert history(out) == history(straight[0])
