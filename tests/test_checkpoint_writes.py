"""A run writes each step's checkpoint once: the end of a run does not write the last step's
state again (benchmarks/outer_step_cost.py: each write is a torch.save and fsyncs)."""

from __future__ import annotations

import pytest
import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import RunDir

BASE = ["task.name=mlp_digits", "inner.steps=5", "report.seeds=1", "output.checkpoint_seconds=0"]


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


@pytest.mark.parametrize(("every", "seconds", "distributed", "expected"), [
    (1, 0.0, False, [1, 2, 3, 4, 5, 6, 7, 8]),
    (1, 2.5, False, [3, 6]),  # steps 1 s apart: after 3 s, then 3 s after that
    (2, 2.5, False, [4, 8]),  # every second step, once 2.5 s have passed
    (1, 2.5, True, [1, 2, 3, 4, 5, 6, 7, 8]),  # under torchrun: steps only
])
def test_checkpoints_wait_for_their_seconds(every, seconds, distributed, expected):
    from hyperdiff.app.experiment import _checkpoint_clock

    now = [0.0]
    config = load_config(overrides=[f"output.checkpoint_every={every}",
                                    f"output.checkpoint_seconds={seconds}"])
    due = _checkpoint_clock(config, distributed=distributed, clock=lambda: now[0])
    written = []
    for step in range(1, 9):
        now[0] += 1.0
        if due(step):
            written.append(step)
    assert written == expected


def test_a_run_killed_between_checkpoints_resumes_to_the_same_history(tmp_path):
    """With a checkpoint only at the end (seconds far above the run's), a run interrupted
    after 3 of 5 steps left no checkpoint of step 3: it resumes from the start of what it
    has and writes the straight run's records."""
    overrides = ["task.name=mlp_digits", "inner.steps=5", "report.seeds=1", "stop.max_steps=5"]
    straight = tmp_path / "straight"
    run_experiment(load_config(overrides=overrides), out=straight, log=lambda _m: None,
                   progress=False)

    class StopError(Exception):
        pass

    def stop_after_3(_opt, record):
        if record.step == 2:
            raise StopError

    killed = tmp_path / "killed"
    with pytest.raises(StopError):
        run_experiment(load_config(overrides=[*overrides, "output.checkpoint_seconds=1e6"]),
                       out=killed, log=lambda _m: None, progress=False,
                       callbacks=[stop_after_3])
    assert RunDir.existing(killed).load_checkpoint() is None
    assert len(RunDir.existing(killed).read_history()) == 3
    run_experiment(None, resume=killed, log=lambda _m: None, progress=False)

    def lines(path):
        return [r.without_timing() for r in RunDir.existing(path).read_history()]

    assert lines(killed) == lines(straight)


def test_history_lines_are_fsynced_once_per_checkpoint_and_before_it(tmp_path, monkeypatch):
    """The history is not fsynced per step: its lines are durable before each checkpoint
    (and the result) that covers them, which is all a resume needs (it cuts the lines after
    the last checkpoint and recomputes them)."""
    import os
    from pathlib import Path

    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc")
    out = tmp_path / "run"
    history = out / "history.jsonl"
    events: list[tuple[str, int]] = []  # (what was fsynced, the history's size then)
    fsync = os.fsync

    def recording(fd):
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        events.append((name, history.stat().st_size if history.exists() else 0))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    overrides = [*BASE, "stop.max_steps=6", "output.checkpoint_every=3"]
    run_experiment(load_config(overrides=overrides), out=out, log=lambda _m: None,
                   progress=False)
    synced = [size for name, size in events if name == "history.jsonl"]
    checkpoints = [size for name, size in events if name.startswith(".checkpoint.pt.")]
    assert len(checkpoints) == 2  # steps 3 and 6
    assert len(synced) == 2  # once before each checkpoint; the result finds nothing new
    # each checkpoint is written after the history lines it covers were fsynced: the history
    # had not grown between the history's fsync and the checkpoint's
    durable = 0
    for name, size in events:
        if name == "history.jsonl":
            durable = size
        elif name.startswith((".checkpoint.pt.", ".manifest.json.", ".result.json.")):
            assert size == durable, (name, size, durable)
    assert durable == history.stat().st_size
    assert [r.step for r in RunDir.existing(out).read_history()] == list(range(6))
