"""The loggers on resume and at a run's end: each step drawn once in TensorBoard (also after a
resume with no history, a step the killed run did not draw, a cut event file), one MLflow run
continued and marked by the run's outcome, a finished run's report handed again, the CSV of
a plain callback started fresh, SQLite's side files refused as links, and matplotlib's config
kept out of the home directory."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_logger_fixes import drawn

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.loggers import CSVLogger, TensorBoardLogger, close_all, config_loggers, start_all
from hyperdiff.errors import HyperdiffError, NonFiniteError

RIDGE = ["task.name=ridge_diabetes", "inner.steps=3", "stop.max_steps=2", "report.seeds=1",
         "output.checkpoint_seconds=0"]


def mlflow_runs(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("hyperdiff").experiment_id])


def once(client, run, key):
    """MLflow's ``{step: value}`` of ``key``, failing on a step logged twice."""
    points = client.get_metric_history(run.info.run_id, key)
    assert max(Counter(p.step for p in points).values()) == 1, f"{key}: a step logged twice"
    return {p.step: p.value for p in points}


def next_second():
    """TensorBoard reads a directory's event files in name order (the second they were
    opened first): a resume's file must come after the killed run's."""
    time.sleep(1.01 - time.time() % 1)


def tiny_problem(steps=5):
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = x.sum(1)

    def loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    return hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(1e-2)),
                           {"w": torch.zeros(3, dtype=torch.float64)}, optimizer=hd.sgd("lr"),
                           train_data=(x, y), val_data=(x, y), steps=steps, probe=False)


def offline_records(steps=4):
    return list(hd.HyperOptimizer(tiny_problem(), lr=0.1,
                                  stopping=hd.Stopping(max_steps=steps)).run().history)


# --- 1: a run stopped before its first checkpoint resumes with no history -------------------

def test_a_resume_with_no_history_draws_each_step_once_and_continues_the_mlflow_run(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from hyperdiff.app.mlflow_logger import MLflowLogger

    records = offline_records()
    board, ml = TensorBoardLogger(tmp_path / "tb"), MLflowLogger(tmp_path / "ml")
    start_all([board, ml], [])
    for record in records[:3]:  # stopped after step 2, before its first checkpoint
        board(None, record)
        ml(None, record)
    close_all([board, ml])
    next_second()
    board = TensorBoardLogger(tmp_path / "tb", resumed=True)
    ml = MLflowLogger(tmp_path / "ml", resumed=True)
    start_all([board, ml], [])  # it starts over: steps 0.. again
    for record in records:
        board(None, record)
        ml(None, record)
    close_all([board, ml])
    assert drawn(tmp_path / "tb", "loss/val") == pytest.approx(
        {r.step: r.val_loss for r in records}, rel=1e-6)
    client, runs = mlflow_runs(tmp_path / "ml")
    assert len(runs) == 1
    assert once(client, runs[0], "loss/val") == {r.step: r.val_loss for r in records}


def test_the_loggers_of_a_run_directory_that_holds_a_run_resume(tmp_path):
    pytest.importorskip("tensorboard")
    log = SimpleNamespace(csv="", tensorboard="tb", mlflow="")
    (new,) = config_loggers(log, tmp_path)
    assert new.resumed is False
    (tmp_path / "config.toml").write_text("")  # a run's file: --resume of it
    (resumed,) = config_loggers(log, tmp_path)
    assert resumed.resumed is True


# --- 2: a step the killed run did not draw --------------------------------------------------

def test_a_resume_draws_the_history_step_the_killed_run_had_not_drawn(tmp_path):
    pytest.importorskip("tensorboard")
    records = offline_records()
    board = TensorBoardLogger(tmp_path / "tb")
    board.start([])
    for record in records[:2]:  # step 2 checkpointed, then killed before TensorBoard drew it
        board(None, record)
    board.close()
    next_second()
    board = TensorBoardLogger(tmp_path / "tb")
    board.start(records[:3])
    board(None, records[3])
    board.close()
    assert drawn(tmp_path / "tb", "loss/val") == pytest.approx(
        {r.step: r.val_loss for r in records}, rel=1e-6)
    assert drawn(tmp_path / "tb", "hparam/lr") == pytest.approx(
        {r.step: r.hparams["lr"] for r in records}, rel=1e-6)


def test_a_resume_draws_again_the_steps_of_an_event_file_cut_mid_record(tmp_path):
    pytest.importorskip("tensorboard")
    records = offline_records()
    board = TensorBoardLogger(tmp_path / "tb")
    board.start([])
    for record in records[:3]:
        board(None, record)
    board.writer.close()
    (file,) = (tmp_path / "tb").glob("events.out.tfevents*")
    file.write_bytes(file.read_bytes()[:-7])  # a kill while step 2's last event was written
    next_second()
    board = TensorBoardLogger(tmp_path / "tb")
    board.start(records[:3])
    board(None, records[3])
    board.close()
    for tag, field in (("loss/val", "val_loss"), ("hparam/lr", None)):  # hparam/lr: cut
        assert drawn(tmp_path / "tb", tag) == pytest.approx(
            {r.step: r.hparams["lr"] if field is None else getattr(r, field) for r in records},
            rel=1e-6)


# --- 3: an online run killed after its last window's checkpoint -----------------------------

def test_a_resume_given_the_loop_draws_the_history_windows_inner_steps_at_the_start(tmp_path):
    """Four windows of 5 steps; killed after window 3's checkpoint, before its loggers saw it:
    the resume has no window left to train, and its loggers get the loop at the start."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from hyperdiff.app.mlflow_logger import MLflowLogger

    problem = tiny_problem(steps=20)
    loop = hd.HyperOptimizer(problem, plan=hd.plans.OnlinePlan(window=5))
    board = TensorBoardLogger(tmp_path / "tb", problem=problem)
    ml = MLflowLogger(tmp_path / "ml", problem=problem)
    start_all([board, ml], [])
    for _ in range(3):
        record = loop.step()
        board(loop, record)
        ml(loop, record)
    loop.step()
    close_all([board, ml])
    assert loop.done
    next_second()
    board = TensorBoardLogger(tmp_path / "tb", problem=problem)
    ml = MLflowLogger(tmp_path / "ml", problem=problem)
    plain = []  # a callback whose start takes no loop still gets the history
    start_all([board, ml, SimpleNamespace(start=plain.append)], list(loop.history), loop)
    close_all([board, ml])
    lrs = {t: loop.history[t // 5].hparams["lr"] for t in range(20)}
    assert plain == [list(loop.history)]
    assert drawn(tmp_path / "tb" / "inner", "inner/lr") == pytest.approx(lrs, rel=1e-6)
    client, (run,) = mlflow_runs(tmp_path / "ml")
    assert once(client, run, "inner/lr") == pytest.approx(lrs, rel=1e-12)


# --- 4: killed after result.json, before the loggers got the report -------------------------

def test_resuming_a_finished_run_hands_its_report_to_the_loggers_again(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    import hyperdiff.app.experiment as experiment

    overrides = [*RIDGE, "log.tensorboard=tb", "log.mlflow=mlruns"]
    def killed(callbacks, result):
        raise KeyboardInterrupt  # after result.json, before the loggers took the report

    monkeypatch.setattr(experiment, "report_all", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(overrides=overrides), out=tmp_path, progress=False,
                       log=lambda _: None)
    monkeypatch.undo()
    result = json.loads((tmp_path / "result.json").read_text())
    assert "logs_complete" not in result
    test_loss = result["tuned"]["metrics"]["test"]["loss"]
    for _ in range(2):  # and again: nothing is written twice
        next_second()
        again = run_experiment(None, resume=tmp_path, progress=False, log=lambda _: None)
        assert again["tuned"] == result["tuned"]
        assert drawn(tmp_path / "tb", "test/loss") == pytest.approx({2: test_loss}, rel=1e-6)
        assert sorted(drawn(tmp_path / "tb", "loss/val")) == [0, 1]
        client, (run,) = mlflow_runs(tmp_path / "mlruns")
        assert run.info.status == "FINISHED"
        assert once(client, run, "test/loss") == {2: test_loss}
        tuned = {f"hparam/{k}": v for k, v in result["tuned"]["hparams"].items()}
        assert {k: float(v) for k, v in run.data.params.items() if k in tuned} == tuned
        # repaired once: later resumes show the result without building the task again
        assert json.loads((tmp_path / "result.json").read_text())["logs_complete"] is True
        monkeypatch.setitem(experiment.PLANS, "offline", None)  # would raise if read
        run_experiment(None, resume=tmp_path, progress=False, log=lambda _: None)
        monkeypatch.undo()


def test_an_extension_killed_and_resumed_keeps_the_first_finish_and_its_steps(tmp_path):
    """Extended from 2 to 4 steps, killed after step 2, resumed: the purge starts at the
    first finish's step (2), so its report and steps 0-1 stay, drawn once."""
    pytest.importorskip("tensorboard")
    overrides = [*RIDGE, "log.tensorboard=tb"]
    first = run_experiment(load_config(overrides=overrides), out=tmp_path, progress=False,
                           log=lambda _: None)

    def stop(opt, record):
        if record.step == 2:
            raise KeyboardInterrupt

    next_second()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(None, resume=tmp_path, overrides=("stop.max_steps=4",), progress=False,
                       log=lambda _: None, callbacks=[stop])
    next_second()
    last = run_experiment(None, resume=tmp_path, progress=False, log=lambda _: None)
    assert drawn(tmp_path / "tb", "test/loss") == pytest.approx(
        {2: first["tuned"]["metrics"]["test"]["loss"],
         4: last["tuned"]["metrics"]["test"]["loss"]}, rel=1e-6)
    assert sorted(drawn(tmp_path / "tb", "loss/val")) == [0, 1, 2, 3]


# --- 5: the divergence guard gave up --------------------------------------------------------

@pytest.mark.parametrize(("error", "status"), [(NonFiniteError, "FAILED"),
                                               (KeyboardInterrupt, "RUNNING")])
def test_mlflow_marks_a_run_whose_guard_gave_up_failed_and_an_interrupted_one_running(
        tmp_path, error, status):
    pytest.importorskip("mlflow")

    class Stop:
        closed = 0

        def __call__(self, opt, record):
            if record.step == 1:
                raise error("the guard gave up" if error is NonFiniteError else "")

        def close(self):  # a user's callback: closed once, as ever
            self.closed += 1

    stop = Stop()
    with pytest.raises(error):
        run_experiment(load_config(overrides=[*RIDGE, "log.mlflow=mlruns"]), out=tmp_path,
                       progress=False, log=lambda _: None, callbacks=[stop])
    _, (run,) = mlflow_runs(tmp_path / "mlruns")
    assert run.info.status == status and stop.closed == 1


# --- 6: a plain callback's CSV over a file from before ---------------------------------------

def test_a_plain_csv_callback_replaces_the_file_of_an_earlier_run(tmp_path):
    path = tmp_path / "steps.csv"
    for _ in range(2):
        hd.HyperOptimizer(tiny_problem(), lr=0.1, stopping=hd.Stopping(max_steps=3)).run(
            callbacks=[CSVLogger(path)])
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("step,status,")
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2"]


# --- 7: matplotlib's config and font cache ---------------------------------------------------

def test_plots_write_no_matplotlib_config_or_font_cache_in_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = textwrap.dedent("""
        import io, os
        import hyperdiff.app.plots, matplotlib
        from matplotlib.figure import Figure
        figure = Figure(); figure.subplots().set_title("x"); figure.savefig(io.BytesIO())
        print(matplotlib.get_configdir(), matplotlib.get_cachedir(),
              os.environ.get("MPLCONFIGDIR"))
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] and out[2] == "None"  # one private directory, the variable unset
    assert not Path(out[0]).is_relative_to(home) and not os.path.exists(out[0])
    assert list(home.rglob("*")) == []
    mine = tmp_path / "mine"  # the user's own MPLCONFIGDIR is used as it is
    mine.mkdir()
    out = subprocess.run([sys.executable, "-c", code],
                         env={**env, "HOME": str(home), "MPLCONFIGDIR": str(mine)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(mine), str(mine), str(mine)] and any(mine.iterdir())


def test_plots_still_read_the_users_matplotlibrc(tmp_path):
    home = tmp_path / "home"
    rc = home / ".config" / "matplotlib" / "matplotlibrc"
    rc.parent.mkdir(parents=True)
    rc.write_text("figure.facecolor: cyan\n")
    code = "import hyperdiff.app.plots, matplotlib; print(matplotlib.rcParams['figure.facecolor'])"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MPLCONFIGDIR", "MATPLOTLIBRC", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["cyan"]
    assert sorted(home.rglob("*")) == [home / ".config", rc.parent, rc]  # nothing written


def test_the_comparison_figure_writes_no_matplotlib_config_in_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = textwrap.dedent("""
        import io
        from hyperdiff.app.cli.compare import comparison_figure
        rows = [{"method": "random", "runs": [1, 2], "time_s": [0.1, 0.2], "best": [0.5, 0.4]}]
        try:
            comparison_figure(rows).savefig(io.BytesIO())
        except Exception:
            pass  # the rows' form is not the point: matplotlib is imported first
        import matplotlib
        print(matplotlib.get_configdir())
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert not Path(out[-1]).is_relative_to(home)
    assert list(home.rglob("*")) == []


# --- 8: SQLite's side files ------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["-journal", "-wal", "-shm"])
def test_a_link_at_an_sqlite_side_file_of_the_mlflow_store_is_refused(tmp_path, suffix):
    pytest.importorskip("mlflow")
    from hyperdiff.app.mlflow_logger import MLflowLogger

    victim = tmp_path / "victim.txt"
    victim.write_text("outside the run directory\n")
    store = tmp_path / "mlruns"
    store.mkdir()
    (store / f"mlflow.db{suffix}").symlink_to(victim)
    with pytest.raises(HyperdiffError, match=f"mlflow.db{suffix}: it is a symbolic link"):
        MLflowLogger(store)
    (store / f"mlflow.db{suffix}").unlink()
    logger = MLflowLogger(store)
    (store / f"mlflow.db{suffix}").symlink_to(victim)  # planted after the logger was made
    with pytest.raises(HyperdiffError, match=f"mlflow.db{suffix}: it is a symbolic link"):
        logger.start([])
    assert victim.read_text() == "outside the run directory\n"


def test_a_store_that_cannot_be_opened_is_one_error_without_mlflows_error_log(tmp_path):
    pytest.importorskip("mlflow")
    from hyperdiff.app.mlflow_logger import STORE_LOGGER, MLflowLogger

    store = tmp_path / "mlruns"
    first = MLflowLogger(store)
    first.start([])
    first.close()
    (store / "mlflow.db-journal").mkdir()  # SQLite cannot open the store now
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger(STORE_LOGGER).addHandler(handler)
    try:
        with pytest.raises(HyperdiffError, match="must be an MLflow database"):
            MLflowLogger(store).start([])
    finally:
        logging.getLogger(STORE_LOGGER).removeHandler(handler)
    assert [r.getMessage()[:60] for r in seen if r.levelno >= logging.ERROR] == []
