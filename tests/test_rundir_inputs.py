"""Run directories in states a user or the file system puts them in (s40 review):

- hard links: a ``run.lock`` hard-linked to an outside file, and a copy made with ``cp -al``,
  are refused before anything is written through them (the other file stays as it was);
- ``hyperdiff plot`` reads the history as ``--resume`` does: an edited value that the
  manifest's ``history_sha256`` catches is refused, a finished run's lines past its result's
  ``steps`` are left out with a warning, a trailing blank line is accepted;
- the manifest is read without following a link or blocking on a FIFO, also for advice;
- a manifest whose elements are damaged is one line before any step is computed;
- a full disk while a new run's start files are written leaves nothing behind, and the
  advice says to run the same command again (also at the first step's append);
- a ``log.csv`` name as long as a file name may be (its temporary is shorter);
- ``output.dir = "~/..."``, a file or a dangling link at ``output.dir``, and a run file that
  cannot be looked at, each one clear line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
from test_rundir import cli_error

from hyperdiff.app.cli import main
from hyperdiff.app.rundir import FIGURES, HISTORY, LOCK, MANIFEST, RunDir, directory, files
from hyperdiff.app.rundir.files import append_bytes, fs_error, remove_temporaries
from hyperdiff.app.rundir.records import recorded_start
from hyperdiff.errors import HyperdiffError

SETTINGS = ["task.name=ridge_diabetes", "inner.steps=20", "stop.max_steps=3",
            "report.seeds=1", "output.checkpoint_seconds=0"]
RUN = ["run", *(a for s in SETTINGS for a in ("--set", s)), "--quiet"]
MORE = ["--set", "stop.max_steps=4", "--quiet"]
PRECIOUS = "precious\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished three-step run (each test edits a copy)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*RUN, "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def lines(path):
    return path.read_text().splitlines()


# ---------------------------------------------------------------------------- hard links
def test_a_lock_file_hard_linked_to_an_outside_file_is_refused(copy, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    (copy / LOCK).unlink()
    os.link(victim, copy / LOCK)
    err = cli_error(capsys, "run", "--resume", str(copy), *MORE)
    assert (f"run directory: cannot lock {copy / LOCK}: it is hard-linked elsewhere (2 names "
            f"share the file), so writing it here would change it there too; remove it "
            f"(`rm {copy / LOCK}`: a run makes a new one)") in err
    assert victim.read_text() == PRECIOUS


def hard_linked_copy(source, target):
    """What ``cp -al source target`` makes."""
    target.mkdir()
    for path in source.iterdir():
        if path.is_file():
            os.link(path, target / path.name)


def test_resuming_a_copy_made_with_hard_links_leaves_the_original_as_it_was(finished, tmp_path,
                                                                          capsys):
    original = tmp_path / "original"
    shutil.copytree(finished, original)
    before = (original / HISTORY).read_bytes()
    backup = tmp_path / "backup"
    hard_linked_copy(original, backup)
    assert f"cannot lock {backup / LOCK}: it is hard-linked elsewhere" in cli_error(
        capsys, "run", "--resume", str(backup), *MORE)
    (backup / LOCK).unlink()  # as the advice says: the history is refused next, before a step
    err = cli_error(capsys, "run", "--resume", str(backup), *MORE)
    assert (f"run directory: cannot append to {backup / HISTORY}: it is hard-linked elsewhere "
            "(2 names share the file), so writing it here would change it there too; copy the "
            "run directory with `cp -r` rather than hard links (`cp -al`, `rsync "
            "--link-dest`) and use the copy") in err
    assert (original / HISTORY).read_bytes() == before


def test_append_refuses_a_hard_linked_file(tmp_path):
    """The CSV log is appended to as the history is."""
    victim = tmp_path / "victim.csv"
    victim.write_text(PRECIOUS)
    os.link(victim, tmp_path / "steps.csv")
    with pytest.raises(HyperdiffError, match="steps.csv: it is hard-linked elsewhere"):
        append_bytes(tmp_path / "steps.csv", b"row\n")
    assert victim.read_text() == PRECIOUS


# ---------------------------------------------------------------------------- plot
def test_plot_refuses_an_edited_value_as_resume_does(copy, capsys):
    history = lines(copy / HISTORY)
    record = json.loads(history[1])
    record["val_loss"] *= 10
    history[1] = json.dumps(record)
    (copy / HISTORY).write_text("\n".join(history) + "\n")
    expected = (f"run directory: {copy / HISTORY}: its first 3 records differ from those that "
                "checkpoint.pt was written with (a record was edited)")
    assert expected in cli_error(capsys, "plot", str(copy))
    assert not (copy / FIGURES).exists()
    assert expected in cli_error(capsys, "run", "--resume", str(copy), *MORE)


def test_plot_leaves_out_lines_past_a_finished_run_with_a_warning(copy, caplog):
    history = lines(copy / HISTORY)
    for step in (3, 4):
        record = json.loads(history[-1])
        record["step"] = step
        history.append(json.dumps(record))
    (copy / HISTORY).write_text("\n".join(history) + "\n")
    rundir = RunDir(copy)
    assert len(rundir.verify_history(rundir.read_history())) == 3
    assert (f"{copy / HISTORY}: lines 4-5 are past the end of the finished run (result.json: 3 "
            "steps), so they are not this run's") in caplog.text
    assert main(["plot", str(copy)]) == 0


def test_plot_and_resume_both_accept_a_trailing_blank_line(copy):
    with open(copy / HISTORY, "a") as handle:
        handle.write("\n")
    assert main(["plot", str(copy)]) == 0
    assert main(["run", "--resume", str(copy), *MORE]) == 0
    assert len(lines(copy / HISTORY)) == 4


# ---------------------------------------------------------------------------- the manifest
def test_advice_reads_no_manifest_through_a_link(copy, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"start_from": {"run": "READ-FROM-OUTSIDE"}}))
    (copy / MANIFEST).unlink()
    (copy / MANIFEST).symlink_to(outside)
    assert recorded_start(copy) is None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_plot_does_not_hang_on_a_fifo_manifest(copy):
    (copy / MANIFEST).unlink()
    os.mkfifo(copy / MANIFEST)
    history = lines(copy / HISTORY)
    history[1] = "{broken"
    (copy / HISTORY).write_text("\n".join(history) + "\n")
    done = subprocess.run([sys.executable, "-m", "hyperdiff", "plot", str(copy)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert f"{copy / HISTORY} line 2 is not valid JSON" in done.stderr


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda m: m.update(extensions=[1]),
     "'extensions' must be a list of {step, from_max_steps, to_max_steps, ...}"),
    (lambda m: m.update(input_changes=[1]),
     "'input_changes' must be a list of {step, changes: [text]}"),
    (lambda m: m["inputs"]["task"].update(kind="file"),
     "'inputs' 'task' of kind 'file' must have a 'path' and a 'sha256' string"),
])
def test_a_manifest_with_damaged_elements_is_one_line_before_a_step(copy, capsys, edit, problem):
    manifest = json.loads((copy / MANIFEST).read_text())
    edit(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    before = (copy / HISTORY).read_bytes()
    err = cli_error(capsys, "run", "--resume", str(copy), *MORE)
    assert f"run directory: {copy / MANIFEST} is damaged (ValueError: {problem}); " in err
    assert (copy / HISTORY).read_bytes() == before


# ---------------------------------------------------------------------------- a full disk
def full_disk_at(monkeypatch, module, name, real):
    def full(path, *args, **kwargs):
        if os.fspath(path).endswith(name):
            raise fs_error(path, "write", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, real.__name__, full)


@pytest.mark.parametrize("made", [True, False])
def test_a_full_disk_while_the_start_files_are_written_leaves_nothing(tmp_path, monkeypatch,
                                                                       capsys, made):
    out = tmp_path / "run"
    if not made:
        out.mkdir()  # the user's empty directory stays (with the lock file alone)
    with monkeypatch.context() as patch:
        full_disk_at(patch, directory, HISTORY, directory.atomic_write_bytes)
        err = cli_error(capsys, *RUN, "--out", str(out))
    assert err.endswith("No space left on device; free some disk space, then run the same "
                        "command again")
    assert ({p.name for p in out.iterdir()} <= {LOCK}) if not made else not out.exists()
    assert main([*RUN, "--out", str(out)]) == 0  # the same command


def test_a_full_disk_at_the_first_step_says_to_run_the_command_again(tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        full_disk_at(patch, directory, HISTORY, directory.append_bytes)
        err = cli_error(capsys, *RUN, "--out", str(out))
    assert err.endswith("free some disk space, then run the same command again")
    assert not out.exists()


# ---------------------------------------------------------------------------- names, places
def test_a_csv_name_as_long_as_a_file_name_may_be(tmp_path):
    name = "c" * 240 + ".csv"
    out = tmp_path / "run"
    assert main([*RUN, "--set", f"log.csv={name!r}", "--out", str(out)]) == 0
    assert len(lines(out / name)) == 4  # the header and three steps
    left = out / f".{'d' * 32}.{'0' * 16}.tmp"
    left.write_text("")
    assert remove_temporaries(out, (name,)) == []  # another name's temporary stays
    leftover = out / f"{files.temporary_prefix(name)}{'0' * 16}.tmp"
    leftover.write_text("")
    assert remove_temporaries(out, (name,)) == [leftover]


def test_an_output_dir_in_the_home_directory_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = cli_error(capsys, *RUN, "--set", "output.dir=~/runs_x")
    assert ("output.dir must be a relative path that does not start with '~' (got '~/runs_x'"
            in err and "with --out (e.g. --out ~/runs)" in err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("planted", ["file", "dangling link"])
def test_a_file_at_the_default_runs_directory_is_named(tmp_path, monkeypatch, capsys, planted):
    monkeypatch.chdir(tmp_path)
    if planted == "file":
        (tmp_path / "runs").write_text(PRECIOUS)
    else:
        (tmp_path / "runs").symlink_to(tmp_path / "missing")
    what = "an existing file" if planted == "file" else "a symbolic link to a missing target"
    err = cli_error(capsys, *RUN)
    assert (f"run: runs, the directory of new runs (without --out or output.dir), must be a "
            f"directory or a new path (got runs, {what}); remove or rename it, or give the run "
            "directory with --out") in err


def test_a_run_file_that_cannot_be_looked_at_is_one_line_with_advice(copy, monkeypatch, capsys):
    """As a run directory at mode 000 does for a user who is not root."""
    real = os.lstat

    def denied(path, *args, **kwargs):
        if os.fspath(path).startswith(str(copy) + os.sep):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(directory.os, "lstat", denied)
    err = cli_error(capsys, "run", "--resume", str(copy), *MORE)
    assert err.endswith(": Permission denied; check the permissions (and immutable attributes, "
                        "`lsattr`) of the file and its directory")
    assert "error: run directory: cannot use " in err


def test_a_resume_that_fails_before_its_first_step_keeps_the_run(tmp_path, monkeypatch):
    """A run stopped while its first checkpoint was written starts over on --resume; when that
    resume failed before its first step, the run's files (config.toml included) were
    discarded as if this process had started the run, and nothing could resume it."""
    from test_rundir_kills import StopAt, assert_same_run, run

    from hyperdiff.errors import HyperdiffError

    run(tmp_path / "straight", "stop.max_steps=3")
    with monkeypatch.context() as patch:
        StopAt(patch, "checkpoint.pt", 1)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "run", "stop.max_steps=3")

    def failing(self, record):
        raise HyperdiffError("run directory: cannot write history.jsonl: simulated")

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "append", failing)
        with pytest.raises(HyperdiffError, match="simulated"):
            run(tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "config.toml").exists()
    run(tmp_path / "run", resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "run")
