"""A run writes each step's checkpoint once: the end of a run does not write the last step's
state again (benchmarks/outer_step_cost.py: each write is a torch.save and fsyncs)."""

from __future__ import annotations

import pytest
import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import RunDir

BASE = ["task.name=mlp_digits", "inner.steps=5", "report.seeds=1"]


@pytest.mark.parametrize(("max_steps", "every", "expected"), [
    (2, 1, [1, 2]),  # every step, the last one included
    (3, 2, [2, 3]),  # every second step, and the last (odd) one when the run ends
])
def test_each_checkpoint_is_written_once(tmp_path, monkeypatch, max_steps, every, expected):
    written: list[int] = []
    save = RunDir.save_checkpoint

    def counting(self, state):
        written.append(int(state["step"]))
        save(self, state)

    monkeypatch.setattr(RunDir, "save_checkpoint", counting)
    out = tmp_path / "run"
    overrides = [*BASE, f"stop.max_steps={max_steps}", f"output.checkpoint_every={every}"]
    run_experiment(load_config(overrides=overrides), out=out, log=lambda _m: None,
                   progress=False)
    assert written == expected
    state = RunDir.existing(out).load_checkpoint()
    assert state is not None and state["step"] == max_steps
    assert [r.step for r in RunDir.existing(out).read_history()] == list(range(max_steps))
    assert all(torch.isfinite(v).all() for v in state["raw"].values())
