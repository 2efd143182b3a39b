"""Run directories: a killed run resumes to the same history; bad resumes are refused."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from interrupt import interrupted_run

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import CHECKPOINT, HISTORY, RunDir
from hyperdiff.tuner.driver import HyperOptimizer, Stopping

# minibatch seeds, two samples per step and warm starts: all must survive the restart
SETTINGS = ["output.checkpoint_seconds=0", "task.name=mlp_digits", "inner.steps=10", "inner.warm_start=true",
            "outer.samples=2", "stop.max_steps=6", "report.seeds=1"]



def quiet(_: str) -> None:
    return None


def histories(path: Path) -> list[dict]:
    return [r.without_timing() for r in RunDir(path).read_history()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "reference"
    result = run_experiment(load_config(overrides=SETTINGS), out=out, log=quiet, progress=False)
    return out, result


def test_sigkilled_run_resumes_to_the_same_history(reference, tmp_path):
    """The child kills itself with SIGKILL while writing the checkpoint of step 3, after
    step 3 reached the history: the resume must cut that line and recompute it."""
    ref_dir, ref_result = reference
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from hyperdiff.app import rundir
        from hyperdiff.app.config import load_config
        from hyperdiff.app.experiment import run_experiment
        calls = {{"n": 0}}
        save = rundir.RunDir.save_checkpoint
        def save_then_die(self, state):
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            save(self, state)
        rundir.RunDir.save_checkpoint = save_then_die
        run_experiment(load_config(overrides={SETTINGS!r}), out={str(out)!r},
                       log=lambda m: None, progress=False)
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert len((out / HISTORY).read_text().splitlines()) == 3
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 2

    result = run_experiment(None, resume=out, log=quiet, progress=False)
    assert histories(out) == histories(ref_dir)
    assert result["tuned"] == ref_result["tuned"]


def test_interrupted_run_resumes_to_the_same_history(reference, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "interrupted"
    interrupted_run(out, SETTINGS, at=4)
    assert len(histories(out)) == 4
    run_experiment(None, resume=out, log=quiet, progress=False)
    assert histories(out) == histories(ref_dir)


def test_resume_with_a_different_config_is_refused(reference):
    ref_dir, _ = reference
    changed = load_config(overrides=[*SETTINGS, "outer.seed=5"])
    with pytest.raises(hd.HyperdiffError, match=r"differs in outer\.seed: 0 there, 5 now"):
        run_experiment(changed, resume=ref_dir, log=quiet)


def test_resuming_a_finished_run_returns_its_result(reference):
    ref_dir, ref_result = reference
    again = run_experiment(None, resume=ref_dir, log=quiet)
    assert again == json.loads((ref_dir / "result.json").read_text()) == ref_result


def test_a_new_run_in_a_used_directory_is_refused(reference):
    ref_dir, _ = reference
    with pytest.raises(hd.HyperdiffError, match="already holds a run"):
        run_experiment(load_config(overrides=SETTINGS), out=ref_dir, log=quiet)


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(hd.HyperdiffError, match="holds no run"):
        run_experiment(None, resume=tmp_path / "nothing", log=quiet)


def test_checkpoint_replacement_is_atomic(tmp_path, monkeypatch):
    """A checkpoint write that fails (here: the disk fills up before the rename) leaves the old
    checkpoint readable and verified, no temporary file, and one clear error."""
    rundir = RunDir(tmp_path)
    rundir.save_checkpoint({"step": 1})
    replace = os.replace

    def full_disk(src, dst):
        if Path(dst).name == CHECKPOINT:
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(hd.HyperdiffError, match="No space left on device; free some disk"):
        rundir.save_checkpoint({"step": 2})
    monkeypatch.setattr(os, "replace", replace)
    assert RunDir(tmp_path).load_checkpoint() == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "manifest.json"]


@pytest.mark.parametrize("optimizer", ["adam", "signstep", "trust"])
def test_driver_state_dict_round_trip_keeps_guard_and_optimizer_state(tmp_path, optimizer):
    """Library level: 2 steps, save, load into a fresh driver, 3 more == 5 straight, with a
    guard event (restored lam, shrunk step) inside the resumed part; for torch's Adam and for
    the outer optimizers of hyperdiff.tuner.outer_steps (their own state and param groups)."""
    from test_driver import flaky, ridge_problem

    problem, selection = ridge_problem(batch_size=6)

    def driver(fail_on):
        return HyperOptimizer(problem, method=flaky(fail_on), samples=2, selection=selection,
                              stopping=Stopping(max_steps=5, patience=None), lr=0.2,
                              optimizer=optimizer)

    straight = driver({6}).run().history  # call 6 = step 3, first sample
    first = driver({6})
    for _ in range(2):
        first.step()
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = driver({2})  # the new process counts calls from 0 again
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True),
                           list(first.history))
    resumed = second.run().history
    assert [r.status for r in straight] == ["ok", "ok", "ok", "failed", "ok"]
    assert [r.without_timing() for r in resumed] == [r.without_timing() for r in straight]
