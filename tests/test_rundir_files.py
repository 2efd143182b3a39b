"""Files written where they must not be (issue 18): every file hyperdiff writes stays inside
the run directory (or a directory named on the command line), never goes through a link and
never takes the place of a run file.

Each refusal is checked through the command line: exit status 2, one line on stderr naming
the key or the file, and the victim outside the run directory untouched.
"""

from __future__ import annotations

import json
import shutil

import pytest
from interrupt import interrupted_run
from test_rundir import cli_error

from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import CONFIG, HISTORY, LOCK, MANIFEST
from hyperdiff.app.rundir.manifest import sha256

SETTINGS = ["task.name=ridge_diabetes", "inner.steps=20", "stop.max_steps=3",
            "report.seeds=1"]
RUN = ["run", *(a for s in SETTINGS for a in ("--set", s)), "--quiet"]
PRECIOUS = "precious"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.csv"
    path.write_text(PRECIOUS)
    return path


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    """A run stopped after 2 of 3 steps, with no [log] files."""
    out = tmp_path_factory.mktemp("unfinished") / "run"
    interrupted_run(out, SETTINGS, at=2)
    return out


# ---------------------------------------------------------------------------- [log] csv
def test_a_link_planted_at_the_csv_path_is_refused_before_the_run_writes(tmp_path, victim,
                                                                          capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "steps.csv").symlink_to(victim)
    err = cli_error(capsys, *RUN, "--set", "log.csv=steps.csv", "--out", str(out))
    assert "steps.csv: it is a symbolic link" in err
    assert victim.read_text() == PRECIOUS
    assert {p.name for p in out.iterdir()} <= {"steps.csv", LOCK}  # no run was started


@pytest.mark.parametrize("setting, link", [("log.csv=logs/steps.csv", "logs"),
                                           ("log.tensorboard=tb", "tb"),
                                           ("log.tensorboard=logs/tb", "logs")])
def test_a_link_planted_at_a_log_folder_is_refused(tmp_path, capsys, setting, link):
    pytest.importorskip("tensorboard")
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / link).symlink_to(outside, target_is_directory=True)
    err = cli_error(capsys, *RUN, "--set", setting, "--out", str(out))
    assert f"{link}: it is a symbolic link" in err
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("value, why", [
    ("../victim.csv", "a path with '..'"),
    ("logs/../../victim.csv", "a path with '..'"),
    ("ABSOLUTE", "an absolute path"),
    (HISTORY, "the run's history.jsonl"),
    ("History.JSONL", "the run's History.JSONL"),  # the same file on macOS and Windows
    (f"{CONFIG}/steps.csv", "the run's config.toml"),
    ("figures/steps.csv", "the run's figures"),
    ("run.lock", "the run's run.lock"),
    (".history.jsonl.0123456789abcdef.tmp", "the run's .history.jsonl"),  # removed on lock
    (".", "the run directory itself"),
])
def test_a_csv_path_outside_the_run_directory_or_on_a_run_file_is_refused(
        tmp_path, victim, capsys, value, why):
    value = str(victim) if value == "ABSOLUTE" else value
    out = tmp_path / "run"
    err = cli_error(capsys, *RUN, "--set", f"log.csv={value!r}", "--out", str(out))
    assert err.startswith("hyperdiff run: error: config: log.csv must be a path inside the "
                          "run directory"), err
    assert f"(got {value!r}: " in err and why in err
    assert victim.read_text() == PRECIOUS and not out.exists()


def test_a_resume_whose_stored_config_names_an_outside_csv_is_refused(unfinished, tmp_path,
                                                                       victim, capsys):
    """A shared run directory whose config.toml (and manifest, to match) was rewritten to log
    into ../victim.csv: the resume refuses before it writes anything."""
    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    text = (run / CONFIG).read_text()
    assert 'csv = ""' in text
    text = text.replace('csv = ""', 'csv = "../victim.csv"')
    (run / CONFIG).write_text(text)
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["files"][CONFIG] = sha256(text.encode())
    (run / MANIFEST).write_text(json.dumps(manifest))
    before.update({CONFIG: (run / CONFIG).read_bytes(), MANIFEST: (run / MANIFEST).read_bytes()})
    err = cli_error(capsys, "run", "--resume", str(run), "--quiet")
    assert "config: log.csv must be a path inside the run directory" in err
    assert "'../victim.csv'" in err
    assert victim.read_text() == PRECIOUS
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_the_csv_in_a_folder_of_the_run_directory_holds_the_history(tmp_path):
    out = tmp_path / "run"
    run_experiment(load_config(overrides=[*SETTINGS, "log.csv=logs/steps.csv"]), out=out,
                   log=lambda _: None, progress=False)
    lines = (out / "logs" / "steps.csv").read_text().splitlines()
    history = (out / HISTORY).read_text().splitlines()
    assert lines[0].startswith("step,status,") and len(lines) == 1 + len(history) == 4
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2"]


# ---------------------------------------------------------------------------- [log] tensorboard
@pytest.mark.parametrize("value, why", [
    ("../tb", "a path with '..'"),
    ("ABSOLUTE", "an absolute path"),
    ("checkpoint.pt", "the run's checkpoint.pt"),
    ("figures", "the run's figures"),
])
def test_a_tensorboard_dir_outside_the_run_directory_or_on_a_run_file_is_refused(
        tmp_path, capsys, value, why):
    value = str(tmp_path / "tb") if value == "ABSOLUTE" else value
    out = tmp_path / "work" / "run"
    err = cli_error(capsys, *RUN, "--set", f"log.tensorboard={value!r}", "--out", str(out))
    assert "config: log.tensorboard must be a path inside the run directory" in err
    assert f"(got {value!r}: " in err and why in err
    assert not (tmp_path / "tb").exists() and not out.exists()


def test_the_csv_must_not_take_the_place_of_the_tensorboard_dir(tmp_path, capsys):
    err = cli_error(capsys, *RUN, "--set", "log.csv=logs", "--set", "log.tensorboard=logs/tb",
                    "--out", str(tmp_path / "run"))
    assert "config: log.csv must not be log.tensorboard's directory" in err


# ---------------------------------------------------------------------------- output.dir
@pytest.mark.parametrize("value, why", [("../outside/x", "a path with '..'"),
                                        ("ABSOLUTE", "an absolute path")])
def test_output_dir_of_a_config_file_must_stay_below_the_working_directory(
        tmp_path, monkeypatch, capsys, value, why):
    value = str(tmp_path / "outside" / "x") if value == "ABSOLUTE" else value
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "tune.toml").write_text(f"[output]\ndir = {json.dumps(value)}\n")
    err = cli_error(capsys, *RUN, "tune.toml")
    assert f"config: output.dir must be a relative path without '..' (got {value!r}" in err
    assert why in err and "--out" in err
    assert not (tmp_path / "outside").exists()


def test_out_on_the_command_line_may_name_any_directory(tmp_path, monkeypatch):
    """The rule binds config files, not the user's own command line (--out wins)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "tune.toml").write_text('[output]\ndir = "../elsewhere"\n')
    assert main([*RUN, "tune.toml", "--out", "../outside/x"]) == 0
    assert (tmp_path / "outside" / "x" / HISTORY).exists()
    assert not (tmp_path / "elsewhere").exists()


# ---------------------------------------------------------------------------- plot, compare
def test_plot_writes_no_figure_when_a_link_is_planted_at_one(unfinished, tmp_path, victim,
                                                             capsys):
    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    (run / "figures").mkdir()
    (run / "figures" / "losses.png").symlink_to(victim)
    assert "losses.png: it is a symbolic link" in cli_error(capsys, "plot", str(run))
    assert victim.read_text() == PRECIOUS
    assert [p.name for p in (run / "figures").iterdir()] == ["losses.png"]


def test_compare_refuses_a_link_at_its_output_before_tuning(tmp_path, victim, capsys,
                                                            monkeypatch):
    from hyperdiff.app.cli import compare

    def tuned(*args, **kwargs):
        raise AssertionError("tuned although its output is refused")

    monkeypatch.setattr(compare, "compare", tuned)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "comparison.json").symlink_to(victim)
    err = cli_error(capsys, "compare", "--task", "ridge_diabetes", "--quiet", "--out", str(out))
    assert "comparison.json: it is a symbolic link" in err
    assert victim.read_text() == PRECIOUS
