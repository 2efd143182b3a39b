"""Run directories under concurrency and damage: the lock, unique names, links, integrity.

Every refusal is checked through the command line's error path: exit status 2 and one line
on stderr that names the file and what is wrong (no traceback).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from interrupt import interrupted_run

import hyperdiff as hd
from hyperdiff.app import experiment
from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import new_run_dir, run_experiment
from hyperdiff.app.rundir import (
    CHECKPOINT,
    CONFIG,
    HISTORY,
    HPARAMS,
    LOCK,
    MANIFEST,
    RESULT,
    RunDir,
    atomic_write_bytes,
)
from hyperdiff.app.rundir.manifest import sha256
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.history import StepRecord

SETTINGS = ["output.checkpoint_seconds=0", "task.name=ridge_diabetes", "inner.steps=20", "stop.max_steps=5",
            "report.seeds=1"]
TIMEOUT = 60


def quiet(_: str) -> None:
    return None


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (path / HISTORY).read_text().splitlines()]


def records(path: Path) -> list[dict]:
    return [r.without_timing() for r in RunDir(path).read_history()]


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI, expect exit status 2 and one line on stderr; return it."""
    status = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: the oracle of every resume here."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_experiment(load_config(overrides=SETTINGS), out=out, log=quiet, progress=False)
    return out


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    """A run interrupted after 3 of 5 steps (checkpoint of step 3, history of 3 lines)."""
    out = tmp_path_factory.mktemp("unfinished") / "run"
    interrupted_run(out, SETTINGS, at=3)
    assert steps_of(out) == [0, 1, 2]
    return out


@pytest.fixture
def copy(unfinished, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(unfinished, target)
    return target


# ---------------------------------------------------------------------------- the lock
def test_a_second_process_on_a_running_directory_is_refused_naming_the_holder(
        straight, tmp_path, capsys):
    """Process A (a child) runs and pauses at step 2; process B (this one, `hyperdiff run
    --resume`) is refused
    with A's pid and host. A is then killed with SIGKILL: the OS drops its lock, and a resume
    finishes the run to the same history as the uninterrupted one."""
    out, ready = tmp_path / "run", tmp_path / "ready"
    script = textwrap.dedent(f"""
        import pathlib, time, torch
        torch.set_num_threads(1)
        from hyperdiff.app.config import load_config
        from hyperdiff.tuner.driver import HyperOptimizer
        from hyperdiff.app.experiment import run_experiment
        step = HyperOptimizer.step
        def pause_at_2(self):
            if self.step_index == 2:
                pathlib.Path({str(ready)!r}).touch()
                time.sleep({TIMEOUT})
            return step(self)
        HyperOptimizer.step = pause_at_2
        run_experiment(load_config(overrides={SETTINGS!r}), out={str(out)!r},
                       log=lambda m: None, progress=False)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():
            assert holder.poll() is None, holder.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "process A never reached step 2"
            time.sleep(0.05)
        err = cli_error(capsys, "run", "--resume", str(out), "--quiet")  # this process: B
        assert f"is in use by another hyperdiff process (pid {holder.pid} on " \
               f"{socket.gethostname()}, started " in err
        assert steps_of(out) == [0, 1]  # B wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=TIMEOUT)
    run_experiment(None, resume=out, log=quiet, progress=False)
    assert records(out) == records(straight)


def test_the_lock_is_held_for_the_whole_run_and_released_after(tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []
    step = HyperOptimizer.step

    def try_to_lock(self):
        with pytest.raises(hd.HyperdiffError, match="is in use by another hyperdiff process"), \
                RunDir(out).lock():
            pass
        seen.append(json.loads((out / LOCK).read_text())["pid"])
        return step(self)

    monkeypatch.setattr(HyperOptimizer, "step", try_to_lock)
    run_experiment(load_config(overrides=SETTINGS), out=out, log=quiet, progress=False)
    assert seen == [os.getpid()] * 5
    with RunDir(out).lock():  # released
        pass


# ---------------------------------------------------------------------------- names
def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment.time, "strftime", lambda fmt: "20260101-120000")
    config = load_config(overrides=SETTINGS)
    barrier, made = threading.Barrier(6), []

    def create():
        barrier.wait(timeout=TIMEOUT)
        made.append(new_run_dir(config).path)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    stem = "runs/ridge_diabetes-20260101-120000"
    assert sorted(map(str, made)) == sorted([stem] + [f"{stem}-{i}" for i in range(2, 7)])
    # two whole runs in the same second: two directories, two histories, two results
    first = run_experiment(config, log=quiet, progress=False)["run_dir"]
    second = run_experiment(config, log=quiet, progress=False)["run_dir"]
    assert (first, second) == (f"{stem}-7", f"{stem}-8")
    assert steps_of(Path(first)) == steps_of(Path(second)) == [0, 1, 2, 3, 4]


def test_a_run_that_fails_before_it_starts_leaves_no_directory_behind(tmp_path, monkeypatch):
    def broken(config):
        raise hd.HyperdiffError("task: broken")

    offline = experiment.PLANS["offline"]
    monkeypatch.setitem(experiment.PLANS, "offline", offline._replace(build=broken))
    with pytest.raises(hd.HyperdiffError, match="task: broken"):
        run_experiment(load_config(overrides=SETTINGS), out=tmp_path / "new", log=quiet)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- --out, --resume
@pytest.mark.parametrize("name", [RESULT, CHECKPOINT, MANIFEST, HISTORY, CONFIG])
def test_out_on_a_directory_holding_another_runs_file_is_refused(tmp_path, capsys, name):
    out = tmp_path / "other"
    out.mkdir()
    (out / name).write_text("another run's file")
    err = cli_error(capsys, "run", "--task", "ridge_diabetes", "--set", "stop.max_steps=1",
                    "--out", str(out), "--quiet")
    assert f"already holds a run ({name})" in err
    assert (out / name).read_text() == "another run's file"


def test_resume_with_out_is_refused(copy, tmp_path, capsys):
    err = cli_error(capsys, "run", "--resume", str(copy), "--out", str(tmp_path / "x"))
    assert "--out must not be given with --resume" in err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- links
@pytest.mark.parametrize("name", [HISTORY, CHECKPOINT, CONFIG, MANIFEST, LOCK])
def test_a_planted_symlink_is_refused_and_nothing_outside_is_written(copy, tmp_path, capsys,
                                                                     name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (copy / name).unlink()
    (copy / name).symlink_to(victim)
    err = cli_error(capsys, "run", "--resume", str(copy), "--quiet")
    assert "it is a symbolic link" in err and name in err
    assert victim.read_text() == "precious"


def test_links_at_the_old_fixed_temporary_names_are_never_written_through(tmp_path):
    """A new run in a directory where links were planted at `checkpoint.pt.tmp` and friends
    (the fixed names of earlier versions): temporary names are random and created with
    O_EXCL | O_NOFOLLOW, so the victim stays untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    for name in (CHECKPOINT, HISTORY, CONFIG, HPARAMS, RESULT, MANIFEST):
        (out / f"{name}.tmp").symlink_to(victim)
    run_experiment(load_config(overrides=SETTINGS), out=out, log=quiet, progress=False)
    assert victim.read_text() == "precious"
    assert steps_of(out) == [0, 1, 2, 3, 4]


def test_atomic_write_refuses_a_link_at_the_final_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "file").symlink_to(victim)
    with pytest.raises(hd.HyperdiffError, match="file: it is a symbolic link"):
        atomic_write_bytes(tmp_path / "file", b"overwritten")
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "victim.txt"]


# ---------------------------------------------------------------------------- integrity
def flip_a_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def replace_checkpoint(run: Path, data: bytes) -> None:
    """Write ``data`` as the checkpoint *and* list it in the manifest: only torch.load can
    then tell that it is damaged."""
    (run / CHECKPOINT).write_bytes(data)
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["checkpoints"][-1]["sha256"] = sha256(data)
    (run / MANIFEST).write_text(json.dumps(manifest))


def edit_history(run: Path, edit) -> None:
    lines = (run / HISTORY).read_text().splitlines()
    (run / HISTORY).write_text("".join(line + "\n" for line in edit(lines)))


def torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Unsafe:
    """Not a tensor or a plain container: torch's weights-only loader refuses it."""


def without_scale(run: Path) -> bytes:
    """The checkpoint without the per-coordinate scales of the default outer optimizer."""
    state = torch.load(run / CHECKPOINT, weights_only=True)
    for entry in state["optimizer"]["state"].values():
        del entry["scale"]
    return torch_bytes(state)


def with_field_removed(line: str) -> str:
    data = json.loads(line)
    del data["val_loss"], data["lr"]
    return json.dumps(data)


def with_edited_loss(line: str) -> str:
    data = json.loads(line)
    data["val_loss"] *= 0.5
    return json.dumps(data)


DAMAGE = {
    "bit flip in the checkpoint": (
        lambda r: flip_a_bit(r / CHECKPOINT, 700),
        f"{CHECKPOINT} is damaged: its sha256 matches none of the checkpoints"),
    "truncated checkpoint": (
        lambda r: replace_checkpoint(r, (r / CHECKPOINT).read_bytes()[:300]),
        "torch.load cannot read"),
    "empty checkpoint": (lambda r: replace_checkpoint(r, b""), "torch.load cannot read"),
    "unsafe pickle": (
        lambda r: replace_checkpoint(r, torch_bytes({"step": 3, "x": Unsafe()})),
        "torch.load(weights_only=True) refused"),
    "checkpoint missing optimizer keys": (
        lambda r: replace_checkpoint(r, without_scale(r)),
        "does not fit this run's driver (HyperOptimizer: the outer optimizer state lacks "
        "the entries ['scale'] that SignStep needs)"),
    "checkpoint of another step": (
        lambda r: replace_checkpoint(r, torch_bytes({"step": 2})),
        "must hold a driver state of step 3"),
    "missing checkpoint": (
        lambda r: (r / CHECKPOINT).unlink(),
        f"{CHECKPOINT} is missing, but {MANIFEST} records a checkpoint of step 3"),
    "edited config": (
        lambda r: (r / CONFIG).write_text((r / CONFIG).read_text().replace("seeds = 1",
                                                                           "seeds = 1 ")),
        f"{CONFIG} was changed after the run started"),
    "edited hparams": (
        lambda r: (r / HPARAMS).write_text((r / HPARAMS).read_text() + " "),
        f"{HPARAMS} was changed after the run started"),
    "missing manifest": (lambda r: (r / MANIFEST).unlink(), f"{MANIFEST} is missing"),
    "garbage manifest": (lambda r: (r / MANIFEST).write_text("{oops"),
                         f"{MANIFEST} is damaged (JSONDecodeError"),
    "history line replaced by another step's": (
        lambda r: edit_history(r, lambda ls: [ls[0], ls[0], ls[2]]),
        f"{HISTORY} line 2 holds step 0 where step 1 belongs"),
    "history line duplicated": (
        lambda r: edit_history(r, lambda ls: [ls[0], ls[1], ls[1], ls[2]]),
        f"{HISTORY} line 3 holds step 1 where step 2 belongs"),
    "history value edited": (
        lambda r: edit_history(r, lambda ls: [ls[0], with_edited_loss(ls[1]), ls[2]]),
        "its first 3 records differ from those that checkpoint.pt was written with"),
    "history line lost": (
        lambda r: edit_history(r, lambda ls: ls[:2]),
        f"{HISTORY} must hold at least 3 steps to resume"),
    "history invalid JSON": (
        lambda r: edit_history(r, lambda ls: [ls[0], ls[1][:40], ls[2]]),
        f"{HISTORY} line 2 is not valid JSON"),
    "history record missing fields": (
        lambda r: edit_history(r, lambda ls: [ls[0], with_field_removed(ls[1]), ls[2]]),
        f"{HISTORY} line 2 is not a step record: the record lacks the field(s) val_loss, lr"),
    "history record of the wrong type": (
        lambda r: edit_history(r, lambda ls: [ls[0], ls[1].replace('"status": "ok"',
                                                                   '"status": 1'), ls[2]]),
        "field 'status' must be str (got 1)"),
    "history not UTF-8": (lambda r: (r / HISTORY).write_bytes(b"\xff\xfe\n"),
                          f"{HISTORY} is not UTF-8 text"),
    "a directory where the history should be": (
        lambda r: ((r / HISTORY).unlink(), (r / HISTORY).mkdir()),
        f"cannot read {{run}}/{HISTORY}: Is a directory; a directory is in the way"),
    "a directory where the checkpoint should be": (
        lambda r: ((r / CHECKPOINT).unlink(), (r / CHECKPOINT).mkdir()),
        f"cannot read {{run}}/{CHECKPOINT}: Is a directory"),
    "result not JSON": (lambda r: (r / RESULT).write_text("{"),
                        f"{RESULT} is not valid JSON (Expecting property name"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_kind_of_damage_is_refused_in_one_line_that_names_it(copy, capsys, kind):
    damage, expected = DAMAGE[kind]
    damage(copy)
    damaged = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    err = cli_error(capsys, "run", "--resume", str(copy), "--quiet")
    assert expected.format(run=copy) in err, err
    # the refusal changed nothing: the user can still repair the directory
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == damaged


def test_the_undamaged_copy_resumes_to_the_uninterrupted_history(copy, straight):
    """The control for the table above: the same copy, untouched, resumes exactly."""
    assert main(["run", "--resume", str(copy), "--quiet"]) == 0
    assert records(copy) == records(straight)
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        [CONFIG, HPARAMS, HISTORY, CHECKPOINT, MANIFEST, RESULT, LOCK])


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, straight):
    """No checkpoint and none recorded (checkpoint_every=10, killed after 2 steps): the run
    restarts from step 0, recomputing the logged steps identically."""
    out = tmp_path / "run"
    settings = [*SETTINGS, "output.checkpoint_every=10"]
    interrupted_run(out, settings, at=2)
    assert steps_of(out) == [0, 1] and not (out / CHECKPOINT).exists()
    run_experiment(None, resume=out, log=quiet, progress=False)
    assert records(out) == records(straight)


# ---------------------------------------------------------------------------- filesystem
FS_ERRORS = {
    "disk full": (errno.ENOSPC, "No space left on device; free some disk space"),
    "file too large": (errno.EFBIG, "File too large; the file is larger than this process"),
    "read-only": (errno.EROFS, "Read-only file system; the file system is read-only"),
    "permission": (errno.EACCES, "Permission denied; check the permissions"),
    "immutable": (errno.EPERM, "Operation not permitted; check the permissions (and "
                               "immutable attributes"),
}


@pytest.mark.parametrize("kind", list(FS_ERRORS))
def test_filesystem_errors_are_one_line_naming_the_file(tmp_path, capsys, monkeypatch, kind):
    """The first checkpoint cannot be written (simulated: this test runs as any user, and root
    ignores permissions)."""
    code, expected = FS_ERRORS[kind]
    replace = os.replace

    def failing(src, dst):
        if Path(dst).name == CHECKPOINT:
            raise (PermissionError if code == errno.EACCES else OSError)(
                code, os.strerror(code))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    out = tmp_path / "run"
    err = cli_error(capsys, "run", "--task", "ridge_diabetes", "--set", "stop.max_steps=2",
                    "--set", "inner.steps=10", "--out", str(out), "--quiet")
    assert f"run directory: cannot write {out / CHECKPOINT}: {expected}" in err, err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_history_that_cannot_be_appended_to_is_one_line(copy, capsys, monkeypatch):
    fsync = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(HISTORY):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc")
    monkeypatch.setattr(os, "fsync", full)
    err = cli_error(capsys, "run", "--resume", str(copy), "--quiet")
    assert f"cannot append to {copy / HISTORY}: No space left on device" in err


# ---------------------------------------------------------------------------- plot, records
def test_plot_skips_an_unfinished_last_line_like_resume(copy, caplog):
    with open(copy / HISTORY, "a") as handle:
        handle.write('{"step": 3, "hparams": {"la')
    assert main(["plot", str(copy)]) == 0
    assert "skipped the unfinished line 4" in caplog.text
    assert len(list((copy / "figures").glob("*.png"))) == 4


@pytest.mark.parametrize("kind", ["history invalid JSON", "history record missing fields",
                                  "history line replaced by another step's"])
def test_plot_refuses_a_damaged_history_in_one_line(copy, capsys, kind):
    damage, expected = DAMAGE[kind]
    damage(copy)
    assert expected in cli_error(capsys, "plot", str(copy))


def test_plot_of_a_missing_directory_is_one_line(tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, "plot", str(tmp_path / "nothing"))


def test_step_record_json_round_trip_and_its_errors():
    record = StepRecord(step=0, hparams={"lam": 0.1, "w": [1.0, None]}, status="ok",
                        train_loss=0.5, val_loss=None, val_loss_std=0.0, selection_loss=None,
                        grad_norm=1.0, grad_std=None, grad={"lam": 0.3}, lr=0.05, best=True,
                        trainings=1, message="", time_s=0.1, step_time_s=0.1)
    assert StepRecord.from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="field 'best' must be bool"):
        StepRecord.from_json(record.to_json().replace('"best": true', '"best": 1'))
    with pytest.raises(ValueError, match="must be a JSON object"):
        StepRecord.from_json("[1, 2]")


def test_plot_refuses_a_planted_figures_link(copy, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (copy / "figures").symlink_to(victim, target_is_directory=True)
    assert "figures: it is a symbolic link" in cli_error(capsys, "plot", str(copy))
    assert list(victim.iterdir()) == []
