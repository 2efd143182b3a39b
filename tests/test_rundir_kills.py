"""A run stopped at the run directory's most awkward moments resumes to the uninterrupted run's
history and result (s39; before, each of these left a run that no command could continue):
while its first checkpoint is written, twice while checkpoints are written, after its guard
gave up but before its result, during an extension (and a plain --resume after it), between
an extension's two writes, while its start files are written; and a FIFO in place of a run
file is an error, not a hang. A stop is a KeyboardInterrupt raised where the file is written
(SIGINT's effect; SIGKILL's is the same here: nothing after that point runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hyperdiff.app.rundir.directory as directory
from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import RunDir

BASE = ["task.name=ridge_diabetes", "inner.steps=10", "output.checkpoint_seconds=0",
        "report.seeds=1", "outer.schedule=constant"]
TIMES = ("time_s", "step_time_s")


def quiet(_: str) -> None:
    return None


def run(out: Path, *settings: str, resume: bool = False) -> dict:
    if resume:
        return run_experiment(None, resume=out, overrides=tuple(settings), log=quiet,
                              progress=False)
    return run_experiment(load_config(overrides=[*BASE, *settings]), out=out, log=quiet,
                          progress=False)


def history(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (out / "history.jsonl").read_text().splitlines()]


def result(out: Path) -> dict:
    found = json.loads((out / "result.json").read_text())
    return {k: found.get(k) for k in ("status", "steps", "best_step", "stop_reason", "message",
                                      "tuned")}


def assert_same_run(a: Path, b: Path) -> None:
    assert history(a) == history(b)
    assert result(a) == result(b)


class StopAt:
    """Raise KeyboardInterrupt at the ``nth`` atomic write of file ``name`` (before it lands)."""

    def __init__(self, monkeypatch, name: str, nth: int = 1):
        self.name, self.left = name, nth
        write = directory.atomic_write_bytes

        def stopping(path, data, **kw):
            if Path(path).name == self.name:
                self.left -= 1
                if self.left == 0:
                    raise KeyboardInterrupt
            return write(path, data, **kw)

        monkeypatch.setattr(directory, "atomic_write_bytes", stopping)


def test_a_run_stopped_while_writing_its_first_checkpoint_starts_over(tmp_path, monkeypatch):
    run(tmp_path / "straight", "stop.max_steps=3")
    with monkeypatch.context() as patch:
        StopAt(patch, "checkpoint.pt", 1)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "run", "stop.max_steps=3")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    run(tmp_path / "run", resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "run")


def test_a_run_stopped_twice_while_writing_checkpoints_resumes(tmp_path, monkeypatch):
    """The second stop used to leave a checkpoint that no manifest entry listed: the entry of
    the file on disk had been dropped for the one that never landed."""
    run(tmp_path / "straight", "stop.max_steps=4")
    with monkeypatch.context() as patch:
        StopAt(patch, "checkpoint.pt", 2)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "run", "stop.max_steps=4")
    with monkeypatch.context() as patch:
        StopAt(patch, "checkpoint.pt", 1)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "run", resume=True)
    run(tmp_path / "run", resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "run")


DIVERGING = ["task.name=logistic_cancer", "outer.mode=online", "inner.steps=60", "outer.lr=10",
             "guard.max_loss_ratio=1000", "output.checkpoint_seconds=0", "report.seeds=1"]


def test_a_run_stopped_after_its_guard_gave_up_ends_as_it_would_have(tmp_path, monkeypatch):
    """Its last checkpoint's guard scale was read as damaged, and a resume went on stepping."""
    def diverging(out):
        return run_experiment(load_config(overrides=DIVERGING), out=out, log=quiet,
                              progress=False)

    with pytest.raises(FloatingPointError, match="outer steps in a row failed"):
        diverging(tmp_path / "straight")
    with monkeypatch.context() as patch:
        StopAt(patch, "result.json", 1)
        with pytest.raises(KeyboardInterrupt):
            diverging(tmp_path / "run")
    with pytest.raises(FloatingPointError, match="outer steps in a row failed"):
        run(tmp_path / "run", resume=True)
    assert result(tmp_path / "run")["status"] == "diverged"
    assert_same_run(tmp_path / "straight", tmp_path / "run")


def test_a_stopped_extension_goes_on_with_a_plain_resume(tmp_path):
    """A plain --resume used to print the 3-step result as final; --from took the half-run's
    values as the run's."""
    run(tmp_path / "straight", "stop.max_steps=6")
    run(tmp_path / "run", "stop.max_steps=3")

    def stop(opt, record):
        if record.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(None, resume=tmp_path / "run", overrides=("stop.max_steps=6",),
                       log=quiet, progress=False, callbacks=[stop])
    config = load_config(overrides=[*BASE, "stop.max_steps=3"])
    with pytest.raises(Exception, match="whose extension to 6 steps has not finished"):
        run_experiment(config, out=tmp_path / "other", start_from=tmp_path / "run", log=quiet,
                       progress=False)
    run(tmp_path / "run", resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "run")


def test_an_extension_stopped_between_its_two_writes_is_taken_back(tmp_path, monkeypatch,
                                                                   caplog):
    """The config used to be written first: a stop before the manifest read as an edit."""
    run(tmp_path / "straight", "stop.max_steps=6")
    run(tmp_path / "run", "stop.max_steps=3")
    with monkeypatch.context() as patch:
        StopAt(patch, "config.toml", 1)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "run", "stop.max_steps=6", resume=True)
    assert result(tmp_path / "run")["steps"] == 3
    run(tmp_path / "run", resume=True)  # undone: the run as it was, finished at 3
    assert "was taken back" in caplog.text
    assert result(tmp_path / "run")["steps"] == 3
    run(tmp_path / "run", "stop.max_steps=6", resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "run")


@pytest.mark.parametrize("name", ["config.toml", "manifest.json"])
def test_a_run_stopped_while_writing_its_start_files_can_start_again(tmp_path, monkeypatch,
                                                                     capsys, name):
    run(tmp_path / "straight", "stop.max_steps=2")
    with monkeypatch.context() as patch:
        StopAt(patch, name, 1)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "run", "stop.max_steps=2")
    assert RunDir(tmp_path / "run").interrupted_start()
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet"]) == 2
    assert "stopped while its start files were written, before its first step: there is " \
        "nothing to resume; start it again with the same command and --out" in \
        capsys.readouterr().err
    run(tmp_path / "run", "stop.max_steps=2")
    assert_same_run(tmp_path / "straight", tmp_path / "run")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["history.jsonl", "checkpoint.pt", "hparams.json"])
def test_a_fifo_in_place_of_a_run_file_is_an_error_not_a_hang(tmp_path, name):
    run(tmp_path / "run", "stop.max_steps=2")
    (tmp_path / "run" / "result.json").unlink()
    (tmp_path / "run" / name).unlink()
    os.mkfifo(tmp_path / "run" / name)
    done = subprocess.run([sys.executable, "-m", "hyperdiff", "run", "--quiet", "--resume",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert f"{name}: it is not a regular file; remove it" in done.stderr


def test_a_from_run_stopped_before_its_first_step_resumes_at_the_tuned_values(
        tmp_path, monkeypatch):
    """s41: the manifest of a --from run holds its start values from its first write; before,
    they were added by a second manifest write, and a run stopped between the two resumed at
    the task's own start (lam 0.01 instead of the source's 0.0113) without a word."""
    run(tmp_path / "source", "stop.max_steps=3")
    straight = run_experiment(load_config(overrides=[*BASE, "stop.max_steps=2"]),
                              out=tmp_path / "straight", log=quiet, progress=False,
                              start_from=tmp_path / "source")
    with monkeypatch.context() as patch:
        StopAt(patch, "manifest.json", 2)  # the first manifest write after the start files
        with pytest.raises(KeyboardInterrupt):
            run_experiment(load_config(overrides=[*BASE, "stop.max_steps=2"]),
                           out=tmp_path / "run", log=quiet, progress=False,
                           start_from=tmp_path / "source")
    run(tmp_path / "run", resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "run")
    assert straight["initial"] == json.loads((tmp_path / "run" / "result.json").read_text())[
        "initial"]
