"""run_experiment's loggers and callbacks: closed on every way out, written by rank 0 only,
with the signal-to-noise record."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

import hyperdiff.app.experiment as experiment
from hyperdiff.app.config import load_config
from hyperdiff.app.loggers import Progress, scalars
from hyperdiff.app.rundir import RunDir

SMALL = ["task.name=ridge_diabetes", "inner.steps=5", "stop.max_steps=3", "report.seeds=1"]


class Watcher:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.closed = False

    def __call__(self, opt, record) -> None:
        self.steps.append(record.step)

    def close(self) -> None:
        self.closed = True


def failing(opt, record) -> None:
    if record.step == 1:
        raise ValueError("a callback's own error")


def test_watchers_are_closed_when_a_callback_raises(tmp_path):
    watcher = Watcher()
    with pytest.raises(ValueError, match="a callback's own error"):
        experiment.run_experiment(load_config(overrides=SMALL), out=tmp_path, progress=False,
                                  log=lambda _: None, callbacks=[watcher, failing])
    assert watcher.steps == [0, 1] and watcher.closed


def test_a_rank_other_than_0_writes_no_log_file(tmp_path, monkeypatch):
    # one process playing rank 1: its run directory calls run here, its [log] files must not
    rank1 = SimpleNamespace(is_root=False, timeout_s=None,  # a job whose ranks agree
                            all_gather=lambda where, value: [value, value])
    monkeypatch.setattr(experiment, "init_from_env", lambda *_: rank1)
    watcher = Watcher()
    config = load_config(overrides=[*SMALL, "log.csv=steps.csv"])
    experiment.run_experiment(config, out=tmp_path, callbacks=[watcher])
    assert len(RunDir(tmp_path).read_history()) == 3 == len(watcher.steps) and watcher.closed
    assert not (tmp_path / "steps.csv").exists()
    assert rank1.timeout_s == config.distributed.timeout_s


def test_the_process_group_is_set_up_with_the_configs_timeout(tmp_path, monkeypatch):
    # torch's own collective timeout and the first collectives' (the run directory, the
    # lock) must be distributed.timeout_s, not the 300 s default
    asked = []
    monkeypatch.setattr(experiment, "init_from_env", lambda *args: asked.append(args))
    config = load_config(overrides=[*SMALL, "distributed.timeout_s=700"])
    experiment.run_experiment(config, out=tmp_path, log=lambda _: None, progress=False)
    assert asked == [(700.0,)]


def test_the_csv_and_the_scalars_carry_the_signal_to_noise_record(tmp_path):
    config = load_config(overrides=["task.name=mlp_digits", "inner.steps=4", "stop.max_steps=2",
                                    "outer.samples=3", "report.seeds=1", "log.csv=steps.csv",
                                    "outer.explore=0"])  # a weak start: no plain points
    experiment.run_experiment(config, out=tmp_path, log=lambda _: None, progress=False)
    records = RunDir(tmp_path).read_history()
    with open(tmp_path / "steps.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records) == 2
    for row, record in zip(rows, records, strict=True):
        assert record.samples == 3 and record.grad_snr is not None  # minibatches: measured
        assert float(row["grad_snr"]) == record.grad_snr and int(row["samples"]) == 3
        assert scalars(record)["outer/grad_snr"] == record.grad_snr


def test_the_progress_bar_counts_the_trainings_each_step_drew():
    # samples="auto" draws 2 or more per step: the bar follows record.trainings, not a guess
    bar = Progress(total=5 + 3 * 2, initial=5, report_trainings=3, enabled=True)
    assert (bar.bar.n, bar.bar.total) == (5, 5 + 3 * 2 + 3)
    for trainings in (7, 13):
        bar(None, SimpleNamespace(step=1, trainings=trainings, selection_loss=None,
                                  val_loss=0.5))
    assert bar.bar.n == 13
    tick = bar.report_phase()
    tick()
    assert (bar.bar.n, bar.bar.total) == (14, 16)
    bar.close()
