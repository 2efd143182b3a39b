"""The run in MLflow: a local tracking store inside the run directory, one MLflow run per run.

``[log] mlflow = "mlruns"`` keeps the store in ``<run dir>/mlruns``: an SQLite database
``mlflow.db`` (MLflow's local store; its older file store is refused by MLflow 3 by default)
and ``artifacts/``, the experiment ``hyperdiff`` and one MLflow run in it. Read it with
``mlflow ui --backend-store-uri sqlite:///<run dir>/mlruns/mlflow.db`` or
``MlflowClient(tracking_uri=...)``. Metrics use the tags of :mod:`hyperdiff.app.tags` (the
same as TensorBoard's); params are the config's keys (``outer.lr``, ``method.name``, ...) at
the start and the tuned values (``hparam/NAME``) at the end (a value that changes later, as
an extended run's, is kept in the run's tags under the same key, since MLflow params never
change). A resumed run continues the same
MLflow run and logs no (metric, step) twice: the steps it already holds are skipped (a resume
recomputes them bit for bit). Metrics are queued and written every 2 s and when the loop
ends, one transaction each (a killed process loses at most those 2 s, which its resume logs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hyperdiff.app.rundir.files import refuse_link
from hyperdiff.app.tags import hparam_tags, inner_tags, record_tags, report_tags, window_steps
from hyperdiff.engine.problem import Problem
from hyperdiff.errors import HyperdiffError
from hyperdiff.tuner.history import StepRecord

EXPERIMENT = "hyperdiff"
DATABASE = "mlflow.db"
BATCH = 1000  # MLflow's limit of metrics per log_batch call
PARAM_BATCH = 100  # ... and of params
STORE_LOGGER = "mlflow.store.db.utils"
FLUSH_S = 2.0  # metrics are written at most this often (and at the end): a transaction each


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The stdlib logger ``name`` at WARNING while the block runs, as it was after."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_installed() -> None:
    """Raise a clear error when MLflow is missing (before the run starts)."""
    try:
        import mlflow  # noqa: F401
    except Exception as err:  # missing, or installed but failing to import (a version clash)
        raise HyperdiffError(
            "log: mlflow must be installed and importable to write MLflow logs (pip install "
            f"'hyperdiff[mlflow]'); got {type(err).__name__}: {err}") from None


class MLflowLogger:
    """A callback that logs the run to an MLflow store in the directory ``store`` (module
    doc); ``problem`` and ``params`` as for
    :class:`~hyperdiff.app.loggers.TensorBoardLogger`."""

    def __init__(self, store: str | Path, *, problem: Problem | None = None,
                 params: Mapping[str, Any] | None = None):
        check_installed()
        self.store = Path(store)
        refuse_link(self.store / DATABASE)  # before the run writes anything
        self.problem, self.params = problem, dict(params or {})
        self.client: Any = None
        self.run_id = ""
        self.logged: set[tuple[str, int]] = set()
        self.pending: list[Any] = []
        self.flushed = time.monotonic()

    @property
    def uri(self) -> str:
        """The store's tracking URI."""
        return f"sqlite:///{(self.store / DATABASE).resolve()}"

    def start(self, history: Sequence[StepRecord]) -> None:
        """Open (or create) the store; a resumed run (``history`` not empty) continues the
        store's latest MLflow run and logs again the steps it lacks (points still queued when
        the run was killed), a new one starts an MLflow run of its own; log the params."""
        from mlflow.tracking import MlflowClient

        refuse_link(self.store / DATABASE)
        try:
            with _quiet(STORE_LOGGER):  # its INFO lines on creating tables, past hyperdiff's -q
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
        runs = self.client.search_runs([experiment_id], max_results=1) if history else []
        run = runs[0] if runs else self.client.create_run(experiment_id)
        self.run_id = run.info.run_id
        self.client.update_run(self.run_id, status="RUNNING")
        self.logged = {(key, point.step) for key in run.data.metrics
                       for point in self.client.get_metric_history(self.run_id, key)}
        self._params({key: str(value) for key, value in self.params.items()})
        specs = None if self.problem is None else self.problem.hparams
        self._log([(key, value, record.step) for record in history
                   for key, value in record_tags(record, specs).items()])
        self.flush()

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
        """Queue the points the run does not hold yet; write them every :data:`FLUSH_S`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(key, value, now, step) for key, value, step in points
                 if (key, step) not in self.logged]
        self.pending.extend(fresh)
        self.logged.update((m.key, m.step) for m in fresh)
        if time.monotonic() - self.flushed >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the queued metrics (one transaction per :data:`BATCH`)."""
        pending, self.pending = self.pending, []
        for first in range(0, len(pending), BATCH):
            self.client.log_batch(self.run_id, metrics=pending[first:first + BATCH])
        self.flushed = time.monotonic()

    def __call__(self, opt: Any, record: StepRecord) -> None:
        if self.client is None:
            self.start([])
        specs = None if self.problem is None else self.problem.hparams
        points = [(key, value, record.step) for key, value in record_tags(record, specs).items()]
        inner = ({} if self.problem is None else
                 inner_tags(self.problem, record.hparams, window_steps(opt, record)))
        for step, tags in inner.items():
            points.extend((key, value, step) for key, value in tags.items())
        self._log(points)

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

    def close(self) -> None:
        """Write what is queued (also when the loop ends on an error or an interrupt)."""
        if self.client is not None:
            self.flush()


__all__ = ["MLflowLogger", "check_installed"]
