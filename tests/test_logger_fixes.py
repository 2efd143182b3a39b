"""The loggers and the Lightning callback after the s40 integration review: an online run that
restarts (hot start) draws each inner step once with the kept value (TensorBoard) and makes
the kept value MLflow's latest; MLflowLogger as a plain callback of HyperOptimizer.run writes
its points and ends its MLflow run; a killed online run's resume logs the inner steps MLflow
lost; the CSV writes an empty cell for a value that is not finite and a column per discrete
choice (and the figure a line per choice); MLflow writes nothing in HOME (telemetry off) and
is refused without sqlalchemy; an extended run keeps each finish's report in TensorBoard as in
MLflow; a resumed Lightning fit and a GradientAccumulationScheduler are refused with their
settings named; limit_train_batches trains as hyperdiff's own run."""

from __future__ import annotations

import csv
import itertools
import os
import re
import subprocess
import sys
import textwrap
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from test_model_logging import schedule_value

import hyperdiff as hd
import hyperdiff.app.mlflow_logger as mlflow_logger
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.loggers import CSVLogger, TensorBoardLogger, hparam_scalars
from hyperdiff.app.mlflow_logger import MLflowLogger
from hyperdiff.app.plots import hparams_figure
from hyperdiff.app.rundir import RunDir
from hyperdiff.app.tags import inner_tags
from hyperdiff.errors import HyperdiffError
from hyperdiff.tuner.history import History
from hyperdiff.tuner.offline_plan import OfflinePlan

ONLINE = ["output.checkpoint_seconds=0", "task.name=horizon_digits", "inner.steps=40",
          "outer.window=10", "report.seeds=1", "outer.hot_start=ignore",
          "output.checkpoint_every=2", "log.tensorboard=tb", "log.mlflow=mlruns"]


def events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loaded = EventAccumulator(str(path), size_guidance={"scalars": 0})
    loaded.Reload()
    return loaded


def drawn(path, tag):
    """TensorBoard's ``{step: value}`` of ``tag``, failing on a step drawn twice."""
    points = events(path).Scalars(tag)
    twice = sorted(s for s, n in Counter(p.step for p in points).items() if n > 1)
    assert not twice, f"{tag}: steps drawn twice {twice[:5]}"
    return {p.step: p.value for p in points}


def latest(client, run_id, key):
    """MLflow's latest point (by timestamp) of ``key`` at each step; no value logged twice at
    a step."""
    out: dict[int, tuple[int, float]] = {}
    seen = Counter()
    for point in client.get_metric_history(run_id, key):
        seen[(point.step, point.value)] += 1
        if point.step not in out or point.timestamp > out[point.step][0]:
            out[point.step] = (point.timestamp, point.value)
    assert max(seen.values()) == 1, f"{key}: a value logged twice at one step"
    return {step: value for step, (_, value) in out.items()}


def mlflow_client(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("hyperdiff").experiment_id])
    return client, run


def next_second():
    """Wait for the clock's next second: TensorBoard reads a directory's event files in name
    order, which is the second they were opened in and then a per-process counter compared as
    text (9 after 10), so a resume in the same process and second may be read first."""
    time.sleep(1.01 - time.time() % 1)


def tiny_problem(lr=1e-2, steps=5):
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = x.sum(1)

    def loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    return hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(lr)),
                           {"w": torch.zeros(3, dtype=torch.float64)}, optimizer=hd.sgd("lr"),
                           train_data=(x, y), val_data=(x, y), steps=steps, probe=False)


# --- 1: the hot-start restart ---------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")
def test_a_restarted_online_run_draws_each_inner_step_once_with_the_kept_value(tmp_path):
    """From 10x too large a peak the run restarts at window 9 (step 200 = 10%); windows 10 and
    11 train steps 0..39 again. TensorBoard draws 0..39 once each, at those windows' values
    (the abandoned pass purged); MLflow's latest point at 0..39 is theirs, and its abandoned
    points past step 39 stay (MLflow deletes none)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from test_online_hot_start import full_length

    problem, loop = full_length(0.5)
    board = TensorBoardLogger(tmp_path / "tb", problem=problem)
    ml = MLflowLogger(tmp_path / "ml", problem=problem)
    for _ in range(12):
        record = loop.step()
        board(loop, record)
        ml(loop, record)
    board.close()
    records = list(loop.history)
    assert loop.restarted and "restarted from theta_0" in records[9].message
    kept = {**inner_tags(problem, records[10].hparams, range(0, 20)),
            **inner_tags(problem, records[11].hparams, range(20, 40))}
    abandoned = inner_tags(problem, records[2].hparams, range(40, 60))
    assert kept[10]["inner/lr"] != pytest.approx(
        inner_tags(problem, records[0].hparams, range(10, 11))[10]["inner/lr"], rel=0.1)
    tb = drawn(tmp_path / "tb" / "inner", "inner/lr")
    assert sorted(tb) == list(range(40))
    assert [tb[t] for t in range(40)] == pytest.approx([kept[t]["inner/lr"] for t in range(40)],
                                                       rel=1e-6)
    client, run = mlflow_client(tmp_path / "ml")
    ours = latest(client, run.info.run_id, "inner/lr")
    assert sorted(ours) == list(range(180))  # windows 0..8; the restarting one is not drawn
    assert [ours[t] for t in range(40)] == [kept[t]["inner/lr"] for t in range(40)]
    assert [ours[t] for t in range(40, 60)] == [abandoned[t]["inner/lr"] for t in range(40, 60)]


# --- 2: a plain callback of HyperOptimizer.run -----------------------------------------------

def test_mlflow_as_a_callback_of_hyperoptimizer_run_writes_every_record_and_ends(tmp_path):
    pytest.importorskip("mlflow")
    ml = MLflowLogger(tmp_path / "ml")
    result = hd.HyperOptimizer(tiny_problem(), lr=0.1,
                               stopping=hd.Stopping(max_steps=4)).run(callbacks=[ml])
    client, run = mlflow_client(tmp_path / "ml")
    assert run.info.status == "FINISHED" and ml.pending == {}
    assert latest(client, run.info.run_id, "loss/val") == {
        r.step: r.val_loss for r in result.history}
    assert latest(client, run.info.run_id, "hparam/lr") == {
        r.step: r.hparams["lr"] for r in result.history}


# --- 3: a killed online run's resume ---------------------------------------------------------



def test_a_resume_logs_the_inner_steps_mlflow_lost_when_the_run_was_killed(tmp_path,
                                                                          monkeypatch):
    """The run dies after window 1 (checkpointed) with MLflow's queue unwritten, as a kill
    leaves it: the resume logs windows 0 and 1's inner steps again, not only its own."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")

    def killed(opt, record):
        if record.step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(mlflow_logger, "FLUSH_S", 1e9)
    monkeypatch.setattr(MLflowLogger, "close", lambda self: self.pending.clear())  # lost
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(overrides=ONLINE), out=tmp_path, progress=False,
                       log=lambda _: None, callbacks=[killed])
    monkeypatch.undo()
    next_second()
    run_experiment(None, resume=tmp_path, progress=False, log=lambda _: None)
    records = RunDir(tmp_path).read_history()
    expected = [schedule_value(records[t // 10].hparams, t, 40) for t in range(40)]
    client, run = mlflow_client(tmp_path / "mlruns")
    ours = latest(client, run.info.run_id, "inner/lr")
    assert sorted(ours) == list(range(40))
    assert [ours[t] for t in range(40)] == pytest.approx(expected, rel=1e-12)
    tb = drawn(tmp_path / "tb" / "inner", "inner/lr")
    assert [tb[t] for t in range(40)] == pytest.approx(expected, rel=1e-6)


# --- 4 and 11: the CSV's cells ---------------------------------------------------------------

def test_a_value_that_is_not_finite_is_an_empty_cell_and_a_vector_summarises_its_finite_ones():
    record = SimpleNamespace(hparams={"lr": None, "w": [1.0, None, 3.0], "v": [None, None]})
    assert hparam_scalars(record) == {
        "hparams/lr": None, "hparams/w/mean": 2.0, "hparams/w/min": 1.0, "hparams/w/max": 3.0,
        "hparams/v/mean": None, "hparams/v/min": None, "hparams/v/max": None}


def test_the_csv_of_a_run_with_a_failed_step_is_written_and_rewritten_on_resume(tmp_path):
    """At outer lr 1e6 step 1's lr overflows (null in the history): its row has an empty
    lr cell, at the run and when a resume writes the file again from the history."""
    path = tmp_path / "steps.csv"
    logger = CSVLogger(path)
    history = hd.HyperOptimizer(tiny_problem(1e-3), plan=OfflinePlan(explore=0),
                                optimizer="sgd", lr=1e6,
                                stopping=hd.Stopping(max_steps=3)).run([logger]).history
    assert [r.status for r in history][:2] == ["ok", "failed"] and history[1].hparams["lr"] is None
    for write in (lambda: None, lambda: CSVLogger(path).start(list(history))):
        write()
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["hparams/lr"] for row in rows] == [
            "" if r.hparams["lr"] is None else repr(r.hparams["lr"]) for r in history]


def test_discrete_hyperparameters_get_a_column_and_a_line_per_choice(tmp_path):
    overrides = ["task.name=arch_digits", "inner.steps=4", "stop.max_steps=3",
                 "report.seeds=1", "log.csv=s.csv"]
    run_experiment(load_config(overrides=overrides), out=tmp_path, progress=False,
                   log=lambda _: None)
    rundir = RunDir(tmp_path)
    records = rundir.read_history()
    with open(tmp_path / "s.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    choices = {"depth": (1, 2, 3), "width": (16, 32, 64, 128),
               "activation": ("relu", "tanh", "gelu")}
    for row, record in zip(rows, records, strict=True):
        for name, labels in choices.items():
            assert f"hparams/{name}/mean" not in row
            assert [float(row[f"hparams/{name}/p/{c}"]) for c in labels] == record.hparams[name]
        assert float(row["hparams/lr"]) == record.hparams["lr"]
    panels = hparams_figure(History(records), rundir.read_hparams()).axes
    depth = panels[0]
    assert depth.get_title() == "depth: probability of each choice"
    assert [line.get_label() for line in depth.get_lines()] == [
        "p(depth[0])", "p(depth[1])", "p(depth[2])"]
    assert [[float(v) for v in line.get_ydata()] for line in depth.get_lines()] == [
        [r.hparams["depth"][i] for r in records] for i in range(3)]
    assert panels[3].get_title() == "lr" and len(panels[3].get_lines()) == 1


# --- 5 and 7: MLflow's installation ----------------------------------------------------------

TELEMETRY_SWITCHES = {  # what switches MLflow's telemetry off besides its own variable
    "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "XDG_CONFIG_HOME", "PYTEST_CURRENT_TEST",
    "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "TF_BUILD",
    "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
    "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID"}


def test_mlflow_writes_nothing_in_home_and_sends_no_telemetry(tmp_path):
    """In a fresh process with an empty HOME (and none of the CI variables that switch
    MLflow's telemetry off by themselves), a logger's run writes nothing there."""
    pytest.importorskip("mlflow")
    home = tmp_path / "home"
    home.mkdir()
    script = textwrap.dedent(f"""
        import os
        from hyperdiff.app.mlflow_logger import MLflowLogger
        logger = MLflowLogger({str(tmp_path / "ml")!r})
        logger.start([])
        logger.close()
        print(os.environ.get("MLFLOW_DISABLE_TELEMETRY"))
    """)
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_SWITCHES}
    done = subprocess.run([sys.executable, "-c", script], env={**env, "HOME": str(home)},
                          capture_output=True, text=True, timeout=300)
    assert sorted(home.rglob("*")) == []
    assert (done.returncode, done.stdout.split()) == (0, ["true"]), done.stderr[-2000:]


def test_mlflow_without_sqlalchemy_is_refused_before_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow.store.tracking.sqlalchemy_store")  # imported before: cached
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # mlflow-skinny: no SQL store
    config = load_config(overrides=["task.name=ridge_diabetes", "log.mlflow=x",
                                    "log.tensorboard=tb"])
    with pytest.raises(HyperdiffError, match=re.escape(
            "log: mlflow's SQLite store must be importable (sqlalchemy, which mlflow-skinny "
            "lacks) to write MLflow logs (pip install 'hyperdiff[mlflow]'); got "
            "ModuleNotFoundError")):
        run_experiment(config, out=tmp_path / "run", progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


# --- 10: an extended run's reports -----------------------------------------------------------

def test_an_extended_run_keeps_each_finish_report_in_tensorboard_as_in_mlflow(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    overrides = ["task.name=ridge_diabetes", "stop.max_steps=2", "report.seeds=1",
                 "log.tensorboard=tb", "log.mlflow=ml"]
    first = run_experiment(load_config(overrides=overrides), out=tmp_path, progress=False,
                           log=lambda _: None)
    next_second()
    last = run_experiment(None, resume=tmp_path, overrides=("stop.max_steps=4",),
                          progress=False, log=lambda _: None)
    assert (first["steps"], last["steps"]) == (2, 4)
    losses = {2: first["tuned"]["metrics"]["test"]["loss"],
              4: last["tuned"]["metrics"]["test"]["loss"]}
    assert losses[2] != losses[4]
    tb = drawn(tmp_path / "tb", "test/loss")
    assert tb == {step: pytest.approx(value, rel=1e-6) for step, value in losses.items()}
    client, run = mlflow_client(tmp_path / "ml")
    assert latest(client, run.info.run_id, "test/loss") == losses


# --- 6, 8, 9: Lightning ----------------------------------------------------------------------

def lightning_parts():
    pytest.importorskip("lightning.pytorch")
    import test_lightning

    return test_lightning


def test_a_resumed_lightning_fit_is_refused_before_its_first_step(tmp_path):
    parts = lightning_parts()
    from hyperdiff.app.lightning import HyperdiffCallback

    trainer = parts.quiet_trainer(tmp_path, max_steps=6)
    trainer.fit(parts.MLP(), datamodule=parts.Data())
    checkpoint = tmp_path / "six.ckpt"
    trainer.save_checkpoint(checkpoint)
    callback = HyperdiffCallback(hd.HyperParameters(lr=hd.scalar(0.1)), window=2, lr=0.5)
    with pytest.raises(HyperdiffError, match=re.escape(
            f"HyperdiffCallback: trainer.fit must start a fresh fit, without ckpt_path (got "
            f"ckpt_path={str(checkpoint)!r}, a resumed fit): the window replay trains from the "
            "module's weights at step 0; tune a fresh fit")):
        parts.quiet_trainer(tmp_path, max_steps=14, callbacks=[callback]).fit(
            parts.MLP(), datamodule=parts.Data(), ckpt_path=checkpoint)
    # a second fit of the same Trainer goes on from its step 6, with a fresh optimizer
    module = parts.MLP()
    again = parts.quiet_trainer(tmp_path, max_steps=6)
    again.fit(module, datamodule=parts.Data())
    again.fit_loop.epoch_loop.max_steps = 14
    again.callbacks.append(HyperdiffCallback(hd.HyperParameters(lr=hd.scalar(0.1)), window=2))
    with pytest.raises(HyperdiffError, match=re.escape(
            "HyperdiffCallback: the fit must start at step 0 (got trainer.global_step = 6, a "
            "resumed fit)")):
        again.fit(module, datamodule=parts.Data())


def test_a_gradient_accumulation_scheduler_is_refused_naming_accumulation(tmp_path):
    parts = lightning_parts()
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    from hyperdiff.app.lightning import HyperdiffCallback

    callback = HyperdiffCallback(hd.HyperParameters(lr=hd.scalar(0.1)), window=2)
    trainer = parts.quiet_trainer(tmp_path, max_epochs=3, callbacks=[
        GradientAccumulationScheduler({1: 2}), callback])
    with pytest.raises(HyperdiffError, match=re.escape(
            "HyperdiffCallback: a GradientAccumulationScheduler's accumulate_grad_batches must "
            "be 1 at every epoch (got {0: 1, 1: 2}): the window replay would not train as the "
            "Trainer does")):
        trainer.fit(parts.MLP(), datamodule=parts.Data())


def test_limit_train_batches_trains_as_hyperdiffs_own_run_over_those_batches(tmp_path):
    """3 of the loader's 5 batches per epoch, 3 epochs: the callback's 9 steps equal
    hyperdiff's own online run over the first 3 batches of each epoch's permutation."""
    parts = lightning_parts()
    from hyperdiff.app.lightning import HyperdiffCallback

    module, reference = parts.MLP(), parts.MLP()
    hparams = hd.HyperParameters(lr=hd.per_step(9, 0.1))
    callback = HyperdiffCallback(hparams, window=3, lr=0.1)
    trainer = parts.quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=3,
                                  callbacks=[callback])
    trainer.fit(module, datamodule=parts.Data())
    loader = parts.Data().train_dataloader()
    batches = [b for _ in range(3) for b in itertools.islice(iter(loader), 3)]
    params = {n: p.detach().clone() for n, p in reference.named_parameters()}
    problem = hd.make_problem(parts.mlp_loss, parts.mlp_loss, hparams, params,
                              optimizer=hd.sgd("lr", 0.9, weight_decay=1e-3),
                              train_data=batches, val_data=list(parts.Data().val_dataloader()),
                              steps=9)
    own = hd.HyperOptimizer(problem, plan=hd.plans.OnlinePlan(window=3), lr=0.1).run()
    assert trainer.global_step == 9 and len(callback.result.history) == len(own.history) == 3
    assert parts.close(dict(module.named_parameters()), own.params) <= parts.TOL
    assert parts.close(callback.tuned.natural(), own.final_hparams.natural()) <= parts.TOL
