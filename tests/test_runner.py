"""One runner for `hyperdiff run`: every outer.mode is one plan in app/plans.py's PLANS."""

from __future__ import annotations

from dataclasses import fields

import pytest

import hyperdiff as hd
from hyperdiff.app import experiment
from hyperdiff.app.config import OuterConfig, load_config
from hyperdiff.app.plans import PLANS


def test_every_mode_the_config_accepts_has_a_plan_and_no_other():
    mode = next(f for f in fields(OuterConfig) if f.name == "mode")
    assert list(PLANS) == mode.metadata["choices"]


@pytest.mark.parametrize("mode", list(PLANS))
def test_the_runner_builds_through_the_modes_plan(tmp_path, monkeypatch, mode):
    built = []

    def recording(config):
        built.append(config.outer.mode)
        raise hd.HyperdiffError("task: stop here")

    monkeypatch.setitem(PLANS, mode, PLANS[mode]._replace(build=recording))
    config = load_config(overrides=["task.name=ridge_diabetes", f"outer.mode={mode}"])
    with pytest.raises(hd.HyperdiffError, match="task: stop here"):
        experiment.run_experiment(config, out=tmp_path / "run", log=lambda _: None,
                                  progress=False)
    assert built == [mode]
    assert not (tmp_path / "run").exists()  # nothing was written: the directory is discarded
