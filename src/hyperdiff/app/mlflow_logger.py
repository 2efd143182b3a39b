"""The run in MLflow: a local tracking store inside the run directory, one MLflow run per run.

``[log] mlflow = "mlruns"`` keeps the store in ``<run dir>/mlruns``: an SQLite database
``mlflow.db`` (MLflow's local store; its older file store is refused by MLflow 3 by default)
and ``artifacts/``, the experiment ``hyperdiff`` and one MLflow run in it. Read it with
``mlflow ui --backend-store-uri sqlite:///<run dir>/mlruns/mlflow.db`` or
``MlflowClient(tracking_uri=...)``. Metrics use the tags of :mod:`hyperdiff.app.tags` (the
same as TensorBoard's); params are the config's keys (``outer.lr``, ``method.name``, ...) at
the start and the tuned values (``hparam/NAME``) at the end (a value that changes later, as
an extended run's, is kept in the run's tags under the same key, since MLflow params never
change). A resumed run continues the same MLflow run, logs again what it lacks of its
history (the records' tags and the inner steps of their windows) and skips every (metric,
step) it holds with the same value (a resume recomputes them bit for bit). MLflow deletes no
point: a step whose value changed (the inner steps an online run trains again after its
hot-start restart) gets a second point, later than the first; MLflow's latest point at a
step is the one that counts. Metrics are queued and written every 2 s and when the loop
ends, one transaction each (a killed process loses at most those 2 s, which its resume
logs); a logger that ``run_experiment`` did not start (a plain callback of
``HyperOptimizer.run``) writes every record at once and marks its MLflow run finished (or
failed) after the loop's last record; a run of ``run_experiment`` is marked finished with its
report, failed when its divergence guard gives up, and stays running when interrupted.
MLflow's usage telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY=true`` unless set): it
would write outside the run directory.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hyperdiff.app.rundir.files import refuse_link
from hyperdiff.app.tags import (
    hparam_tags,
    inner_points,
    kept_inner_tags,
    record_tags,
    report_tags,
)
from hyperdiff.engine.problem import Problem
from hyperdiff.errors import HyperdiffError
from hyperdiff.tuner.history import StepRecord

EXPERIMENT = "hyperdiff"
DATABASE = "mlflow.db"
BATCH = 1000  # MLflow's limit of metrics per log_batch call
PARAM_BATCH = 100  # ... and of params
STORE_LOGGER = "mlflow.store.db.utils"
SIDECARS = ("-journal", "-wal", "-shm")  # SQLite's files beside the database, opened with it
FLUSH_S = 2.0  # metrics are written at most this often (and at the end): a transaction each


@contextmanager
def _quiet(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """The stdlib logger ``name`` at ``level`` while the block runs, as it was after."""
    logger = logging.getLogger(name)
    was = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(was)


def check_installed() -> None:
    """Raise a clear error when MLflow or its SQLite store (sqlalchemy, which
    ``mlflow-skinny`` lacks) is missing, before the run starts. MLflow's telemetry is switched
    off first (``MLFLOW_DISABLE_TELEMETRY``, unless the environment sets it): importing MLflow
    would otherwise write ``~/.config/mlflow/telemetry.json`` and send usage data."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    needs = {"mlflow": "mlflow must be installed and importable",
             "sqlalchemy": "mlflow's SQLite store must be importable (sqlalchemy, which "
                           "mlflow-skinny lacks)",
             "mlflow.store.tracking.sqlalchemy_store": "mlflow's SQLite store must be importable"}
    for module, what in needs.items():
        try:
            importlib.import_module(module)
        except Exception as err:  # missing, or installed but failing to import (a version clash)
            raise HyperdiffError(
                f"log: {what} to write MLflow logs (pip install 'hyperdiff[mlflow]'); got "
                f"{type(err).__name__}: {err}") from None


class MLflowLogger:
    """A callback that logs the run to an MLflow store in the directory ``store`` (module
    doc); ``problem`` and ``params`` as for
    :class:`~hyperdiff.app.loggers.TensorBoardLogger`; ``resumed``: the run is resumed
    (also one with no history: stopped before its first checkpoint), so the store's latest
    MLflow run goes on."""

    def __init__(self, store: str | Path, *, problem: Problem | None = None,
                 params: Mapping[str, Any] | None = None, resumed: bool = False):
        check_installed()
        self.store = Path(store)
        self._refuse_links()  # before the run writes anything
        self.problem, self.params = problem, dict(params or {})
        self.resumed = bool(resumed)
        self.client: Any = None
        self.run_id = ""
        self.held: dict[tuple[str, int], tuple[float, int]] = {}  # latest (value, timestamp)
        self.pending: dict[tuple[str, int], Any] = {}
        self.flushed = time.monotonic()
        self.backlog: list[StepRecord] = []  # a resumed run's history, its inner steps to log
        self.managed = False  # started by start(): close() follows

    def _refuse_links(self) -> None:
        """Refuse a symbolic link at the database or at a file SQLite opens beside it (its
        journal, write-ahead log and shared memory), which SQLite would write through."""
        for name in (DATABASE, *(DATABASE + s for s in SIDECARS)):
            refuse_link(self.store / name)

    @property
    def uri(self) -> str:
        """The store's tracking URI."""
        return f"sqlite:///{(self.store / DATABASE).resolve()}"

    def start(self, history: Sequence[StepRecord], loop: Any = None) -> None:
        """Open (or create) the store; a resumed run (``history`` not empty, or ``resumed``)
        continues the store's latest MLflow run and logs again what it lacks of the history
        (points still queued when the run was killed): the records' tags here, their windows'
        inner steps here with ``loop`` (the restored loop), else with the first record (which
        brings the loop); a new run starts an MLflow run of its own. Log the params. A logger
        started here queues its points until :meth:`close`."""
        from mlflow.tracking import MlflowClient

        self._refuse_links()
        try:  # its INFO lines on creating tables, past hyperdiff's -q; its ERROR traceback
            with _quiet(STORE_LOGGER, logging.CRITICAL):  # of a store it cannot open
                self.client = MlflowClient(tracking_uri=self.uri)
                experiment = self.client.get_experiment_by_name(EXPERIMENT)
        except Exception as err:  # a damaged or foreign database: one line, not sqlalchemy's
            first = str(err).splitlines()[0] if str(err) else ""
            raise HyperdiffError(
                f"log: the MLflow store {self.store / DATABASE} must be an MLflow database "
                f"(got {type(err).__name__}: {first[:200]}); restore it, or move it away and "
                "resume to start a new MLflow run there") from None
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(
                             EXPERIMENT, artifact_location=(self.store / "artifacts").resolve()
                             .as_uri()))
        self.resumed = self.resumed or bool(history)
        runs = self.client.search_runs([experiment_id], max_results=1) if self.resumed else []
        run = runs[0] if runs else self.client.create_run(experiment_id)
        self.run_id = run.info.run_id
        self.client.update_run(self.run_id, status="RUNNING")
        self.held = self._latest(run.data.metrics)
        self._params({key: str(value) for key, value in self.params.items()})
        specs = None if self.problem is None else self.problem.hparams
        self._log([(key, value, record.step) for record in history
                   for key, value in record_tags(record, specs).items()])
        self.backlog, self.managed = list(history), True
        if loop is not None:
            inner = (kept_inner_tags(self.problem, loop, self.backlog)
                     if self.problem is not None and self.backlog else {})
            self._log([(key, value, step) for step, tags in inner.items()
                       for key, value in tags.items()])
            self.backlog = []
        self.flush()

    def _latest(self, keys: Iterable[str]) -> dict[tuple[str, int], tuple[float, int]]:
        """The run's latest point (value, timestamp) of each metric in ``keys`` at each step."""
        latest: dict[tuple[str, int], tuple[float, int]] = {}
        for key in keys:
            for point in self.client.get_metric_history(self.run_id, key):
                known = latest.get((key, point.step))
                if known is None or point.timestamp >= known[1]:
                    latest[(key, point.step)] = (point.value, point.timestamp)
        return latest

    def _params(self, values: Mapping[str, str]) -> None:
        """Log ``values`` as params; one the run holds with another value (an extended run's
        ``stop.max_steps``, its newer tuned values) goes to the run's tags instead, as MLflow
        params cannot change."""
        from mlflow.entities import Param, RunTag

        known = self.client.get_run(self.run_id).data.params
        params = [Param(k, v) for k, v in values.items() if k not in known]
        for first in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[first:first + PARAM_BATCH])
        tags = [RunTag(k, v) for k, v in values.items() if k in known and known[k] != v]
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    def _log(self, points: list[tuple[str, float, int]]) -> None:
        """Queue the points the run does not hold with the same value (one it holds with
        another gets a later timestamp, which makes it the latest); write them every
        :data:`FLUSH_S`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value, step in points:
            known = self.held.get((key, step))
            if known is not None and known[0] == value:
                continue
            stamp = now if known is None else max(now, known[1] + 1)
            self.pending[(key, step)] = Metric(key, value, stamp, step)  # replaces a queued one
            self.held[(key, step)] = (value, stamp)
        if time.monotonic() - self.flushed >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the queued metrics (one transaction per :data:`BATCH`)."""
        pending, self.pending = list(self.pending.values()), {}
        for first in range(0, len(pending), BATCH):
            self.client.log_batch(self.run_id, metrics=pending[first:first + BATCH])
        self.flushed = time.monotonic()

    def __call__(self, opt: Any, record: StepRecord) -> None:
        if self.client is None:  # a plain callback: no close() will follow
            self.start([])
            self.managed = False
        specs = None if self.problem is None else self.problem.hparams
        points = [(key, value, record.step) for key, value in record_tags(record, specs).items()]
        inner = inner_points(self.problem, opt, self.backlog, record)
        self.backlog = []
        for step, tags in inner.items():
            points.extend((key, value, step) for key, value in tags.items())
        self._log(points)
        ended = bool(getattr(opt, "done", False))
        if ended or not self.managed:
            self.flush()
        if ended and not self.managed:  # no report will come to mark it
            self.client.set_terminated(
                self.run_id, status="FINISHED" if record.status == "ok" else "FAILED")

    def report(self, result: Mapping[str, Any]) -> None:
        """The final report's metrics at the run's last step, the tuned values as params, and
        the run marked finished."""
        if self.client is None:
            self.start([])
        step = int(result.get("steps", 0))
        self._log([(key, value, step) for key, value in report_tags(result).items()])
        tuned = hparam_tags(result.get("tuned", {}).get("hparams", {}),
                            None if self.problem is None else self.problem.hparams)
        self._params({key: repr(value) for key, value in tuned.items()})
        self.flush()
        self.client.set_terminated(self.run_id, status="FINISHED")

    def close(self, failed: bool = False) -> None:
        """Write what is queued (also when the loop ends on an error or an interrupt);
        ``failed``: the divergence guard gave up, and the run is marked failed (an interrupted
        run stays running: its resume goes on)."""
        if self.client is not None:
            self.flush()
            if failed:
                self.client.set_terminated(self.run_id, status="FAILED")


__all__ = ["MLflowLogger", "check_installed"]
