"""Progress everywhere: every long phase (offline steps, online windows, the final report's
retrainings, check, compare's searches and their winners' retrainings) draws a bar with an
ETA and leaves a one-line "... done" summary; with -q, or off a terminal, nothing."""

from __future__ import annotations

import io
import re
import sys

import pytest

from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment

SMALL = ["task.name=ridge_diabetes", "inner.steps=5", "stop.max_steps=3", "report.seeds=1"]
ONLINE = ["task.name=horizon_digits", "inner.steps=20", "outer.window=5", "report.seeds=1",
          "outer.hot_start=ignore"]


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal, as tqdm asks."""

    def isatty(self) -> bool:
        return True


def renders(text: str) -> list[str]:
    """The states a bar drew (tqdm redraws its line after a carriage return)."""
    return [part.strip() for part in re.split(r"[\r\n]", text) if part.strip()]


def bar_lines(text: str) -> list[str]:
    return [line for line in renders(text) if re.search(r"\d+%\|", line)]


def summary(text: str, desc: str) -> str:
    """The last state of the bar ``desc``: the line it leaves on screen."""
    lines = [line for line in bar_lines(text) if line.startswith(desc)]
    assert lines, f"no bar {desc!r} in {text!r}"
    return lines[-1]


def test_an_offline_run_counts_its_steps_and_report_and_leaves_a_summary(tmp_path, capsys):
    run_experiment(load_config(overrides=SMALL), out=tmp_path, progress=True,
                   log=lambda _: None)
    err = capsys.readouterr().err
    lines = bar_lines(err)
    assert any("/5 [" in line and "training" in line for line in lines)  # 3 steps + 2 report
    assert any(line.startswith("ridge_diabetes final report") for line in lines)
    last = summary(err, "ridge_diabetes")
    assert last.startswith("ridge_diabetes done: 100%") and "5/5" in last
    assert "steps=3" in last and "best loss=" in last
    assert err.endswith("\n")  # it stays on screen


def test_an_online_run_shows_each_windows_loss_and_leaves_a_summary(tmp_path, capsys):
    run_experiment(load_config(overrides=ONLINE), out=tmp_path, progress=True,
                   log=lambda _: None)
    err = capsys.readouterr().err
    lines = bar_lines(err)
    # one unit per inner step: the run's 20 and the report's 2 trainings of 20
    assert any("/60 [" in line and "step" in line for line in lines)
    assert any("loss=" in line and "/60" in line and "final report" not in line
               for line in lines)  # the current window's validation loss
    last = summary(err, "horizon_digits")
    assert last.startswith("horizon_digits done: 100%") and "60/60" in last
    # 4 windows and a weak start's try: from lr_peak 0.05 the first window removes too little
    # for a 20-step run, which starts over at 0.5 (outer.retry, tuner/online_retry.py)
    assert "steps=5" in last and "best loss=" in last


def test_check_leaves_a_summary(capsys):
    from hyperdiff.app.tasks import build_task
    from hyperdiff.diagnose.check import check

    check(build_task("ridge_diabetes", steps=5).problems[0], memory=False, progress=True)
    last = summary(capsys.readouterr().err, "check")
    assert last.startswith("check done: 100%") and "methods against finite differences" in last


def test_compare_shows_every_phase_with_its_winners_retraining(capsys):
    from hyperdiff.app.cli.compare import compare

    config = load_config(overrides=SMALL)
    compare(config, budget=4, tpe=False, progress=True, log=lambda _: None)
    err = capsys.readouterr().err
    # hyperdiff: 3 trainings + 1 retraining of its winner; random: 4 trials + 1
    hyper, random = summary(err, "ridge_diabetes"), summary(err, "random")
    assert hyper.startswith("ridge_diabetes done: 100%") and "4/4" in hyper
    assert random.startswith("random done: 100%") and "5/5" in random
    assert "best loss=" in random
    assert any(line.startswith("random final report") for line in bar_lines(err))


@pytest.mark.parametrize("command", [
    ["run", *(a for item in SMALL for a in ("--set", item))],
    ["check", "ridge_diabetes", "--steps", "5"],
    ["compare", *(a for item in SMALL for a in ("--set", item)), "--budget", "4",
     "--no-tpe"],
])
def test_the_cli_draws_bars_on_a_terminal_and_none_with_quiet(tmp_path, monkeypatch, capsys,
                                                              command):
    drawn = {}
    for quiet in (False, True):
        stream = Terminal()
        monkeypatch.setattr(sys, "stderr", stream)
        out = ["--out", str(tmp_path / f"out{quiet}")] if command[0] != "check" else []
        assert main([*command, *out, *(["-q"] if quiet else [])]) == 0
        drawn[quiet] = bar_lines(stream.getvalue())
    assert drawn[False] and any(" done: 100%" in line for line in drawn[False])
    assert drawn[True] == []
    capsys.readouterr()
