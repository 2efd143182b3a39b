"""Watching long work: per-step loggers (CSV, TensorBoard), the callback hook, progress bars.

A *callback* is any callable ``callback(optimizer, record)``: the
:class:`~hyperdiff.HyperOptimizer` (or the online tuner) and the
:class:`~hyperdiff.tuner.history.StepRecord` of the outer step (window) that just ended
(successful or failed). Pass callbacks to ``HyperOptimizer.run(callbacks=...)`` or
``hyperdiff.app.experiment.run_experiment(..., callbacks=...)``; that is the hook for
Weights & Biases or anything else::

    def to_wandb(opt, record):
        wandb.log(scalars(record), step=record.step)

That call is all ``HyperOptimizer.run`` makes. ``run_experiment`` also calls a callback's
``start(history)`` (once before the first step, with the records of a resumed run; also
``loop=``, the restored loop, where ``start`` takes it), ``close()`` (when the loop ends, also
on an error; ``failed=True`` where ``close`` takes it and the divergence guard gave up) and
``report(result)`` (with the final result once ``result.json`` is written), where it defines
them. :class:`CSVLogger`,
:class:`TensorBoardLogger` and :class:`~hyperdiff.app.mlflow_logger.MLflowLogger` are such
callbacks, complete as plain ones too: without ``start`` they begin at their first record and
write every record as it comes. ``[log] csv``, ``[log] tensorboard`` and ``[log] mlflow`` in a
config switch them on for ``hyperdiff run``. The tags that TensorBoard and MLflow get are
:mod:`hyperdiff.app.tags`'s (docs/logging.md). :class:`Progress` is the bar of each long phase.
"""
from __future__ import annotations

import csv
import inspect
import io
import math
import os
import secrets
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from hyperdiff.app.rundir.directory import RunDir
from hyperdiff.app.rundir.files import (
    append_bytes,
    atomic_write_bytes,
    os_errors,
    refuse_link,
    remove_temporaries,
)
from hyperdiff.app.rundir.paths import inside_run_dir, make_directories
from hyperdiff.app.tags import (
    hparam_tags,
    inner_points,
    kept_inner_tags,
    record_tags,
    report_tags,
    run_params,
    safe,
)
from hyperdiff.engine.problem import Problem
from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.hparams.discrete import label
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.tuner.history import StepRecord

LOSS_FIELDS = ("train_loss", "val_loss", "val_loss_std", "selection_loss", "grad_norm",
               "grad_std", "grad_snr", "lr")
CSV_FIELDS = ("step", "status", *LOSS_FIELDS, "best", "trainings", "samples", "time_s",
              "step_time_s", "message")


def scalars(record: StepRecord, hparams: HyperParameters | None = None) -> dict[str, float]:
    """The record's numbers by tag (:func:`~hyperdiff.app.tags.record_tags`: ``loss/val``,
    ``outer/lr``, ``hparam/NAME``, ...); ``None`` values are left out. With the problem's
    ``hparams``, a discrete hyperparameter's probabilities are tagged by choice
    (``hparam/NAME/p/CHOICE``), as TensorBoard and MLflow get them."""
    return record_tags(record, hparams)


def hparam_scalars(record: StepRecord, hparams: HyperParameters | None = None
                   ) -> dict[str, float | None]:
    """The CSV's columns of the hyperparameters: ``hparams/NAME`` (a scalar),
    ``hparams/NAME/mean|min|max`` (a vector, over its finite entries) or, with the problem's
    ``hparams``, ``hparams/NAME/p/CHOICE`` (a discrete one's probability of each choice).
    ``None`` (an empty cell) where a failed step's value is not finite.

    >>> from types import SimpleNamespace
    >>> hparam_scalars(SimpleNamespace(hparams={"lr": None, "wd": [0.1, None, 0.3]}))
    {'hparams/lr': None, 'hparams/wd/mean': 0.2, 'hparams/wd/min': 0.1, 'hparams/wd/max': 0.3}
    """
    out: dict[str, float | None] = {}
    for name, value in record.hparams.items():
        spec = None if hparams is None else hparams.get(name)
        if spec is not None and spec.is_discrete:
            choices = getattr(spec, "choices", ())
            entries = value if isinstance(value, list) else [None] * len(choices)
            out.update({f"hparams/{name}/p/{safe(label(c))}": _finite(p)
                        for c, p in zip(choices, entries, strict=True)})
        elif isinstance(value, list):
            known = [float(v) for v in value if _finite(v) is not None]
            out.update({f"hparams/{name}/mean": sum(known) / len(known) if known else None,
                        f"hparams/{name}/min": min(known, default=None),
                        f"hparams/{name}/max": max(known, default=None)})
        else:
            out[f"hparams/{name}"] = _finite(value)
    return out


def _finite(value: Any) -> float | None:
    """``value`` as a float, or ``None`` when it is ``None`` or not finite."""
    return None if value is None or not math.isfinite(value) else float(value)


def log_path(caller: str, name: str, value: Any) -> Path:
    """``value`` as a :class:`~pathlib.Path`, refused unless it is a non-empty str or path."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise HyperdiffError(f"{caller}: {name} must be a non-empty path (a str or "
                             f"os.PathLike; got {describe(value)})")
    return Path(value)


class CSVLogger:
    """One CSV row per outer step: the record's fields (``CSV_FIELDS``) and, for each
    hyperparameter, its value (a vector's mean, min and max; with ``hparams``, the problem's,
    a discrete one's probability of each choice: :func:`hparam_scalars`). Floats are written
    with ``repr`` so that they read back exactly; ``None`` is an empty cell. On resume the file is
    rewritten from the history first, so its rows always equal the history. The file is
    written as run files are (:mod:`hyperdiff.app.rundir.files`): replaced atomically at the start
    (a plain callback's at its first record: a file there from before is replaced), appended
    after, never through a symbolic link."""

    def __init__(self, path: str | Path, *, hparams: HyperParameters | None = None):
        self.path = log_path("CSVLogger", "path", path)
        self.hparams = hparams
        self.columns: list[str] | None = None
        self.started = False

    def start(self, history: Sequence[StepRecord]) -> None:
        """Replace the file with the header and one row per record of ``history`` (resume)."""
        self.started = True
        with os_errors(self.path.parent, "create the directory"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.path.parent, (self.path.name,))
        self.columns = None
        atomic_write_bytes(self.path, b"".join(self._line(r) for r in history),
                           sync_directory=False)

    def __call__(self, opt: Any, record: StepRecord) -> None:
        if not self.started:
            self.start([])
        append_bytes(self.path, self._line(record))

    def _line(self, record: StepRecord) -> bytes:
        """The record's row (after the header, when it is the first), as CSV bytes."""
        row = self.row(record)
        text = io.StringIO()
        writer = csv.writer(text)
        if self.columns is None:
            self.columns = list(row)
            writer.writerow(self.columns)
        writer.writerow([_cell(row.get(c)) for c in self.columns])
        return text.getvalue().encode()

    def row(self, record: StepRecord) -> dict[str, Any]:
        """``{column: value}`` of ``record``'s row: its ``CSV_FIELDS``, then the hparams'."""
        return {**{k: getattr(record, k) for k in CSV_FIELDS},
                **hparam_scalars(record, self.hparams)}

    def close(self) -> None:
        """Nothing to do: every row is appended and closed as it is written."""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


class TensorBoardLogger:
    """The run in TensorBoard, in the tag scheme of :mod:`hyperdiff.app.tags`: every record's
    losses, outer-loop numbers and the model's hyperparameters at ``global_step =
    record.step``; with ``problem`` (the inner problem), the discrete choices by name and, for
    an online loop, the inner optimizer's coefficients at every inner step of each window
    (in the sub-directory ``inner``, a run of its own); :meth:`report` adds the final report's
    metrics and the HParams view (``params``: the config's keys, with the tuned values).

    Each curve is drawn once: a resumed run (``history`` not empty, or ``resumed``: a run
    stopped before its first checkpoint resumes with none) purges every event from step 0 and
    draws its history again, records and (with the loop) the inner steps of their windows, so
    that a step the killed run did not draw (killed after its checkpoint, or in the middle of
    writing an event) is drawn; an online run that goes back (the hot-start restart: step 0
    again) purges the inner steps from there. ``finished``: the result of the run's earlier
    finish (an extended run's ``result.json``, or a finished run's whose report is handed to
    the loggers again): a resume purges from its step, keeping the steps and earlier reports
    before it, and writes its report again."""

    def __init__(self, log_dir: str | Path, *, problem: Problem | None = None,
                 params: Mapping[str, Any] | None = None,
                 finished: Mapping[str, Any] | None = None, resumed: bool = False):
        self.log_dir = log_path("TensorBoardLogger", "log_dir", log_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as err:  # missing, or failing to import (a version clash)
            raise HyperdiffError(
                "log: tensorboard must be installed and importable to write TensorBoard logs "
                f"(pip install 'hyperdiff[tensorboard]'); got {type(err).__name__}: {err}"
            ) from None
        self._writer_class = SummaryWriter
        self.problem, self.params = problem, dict(params or {})
        self.finished = finished
        self.writer: Any = None
        self.inner: Any = None
        self.resumed = bool(resumed)
        self.backlog: list[StepRecord] = []  # a resumed run's history, its inner steps to draw
        self.inner_stop = 0  # one past the last inner step drawn
        self.drawn_report: tuple[int, dict[str, float]] | None = None  # (step, metrics)

    def _writer(self, path: Path, purge_step: int | None) -> Any:
        # a random suffix makes the event file's name unguessable, so no link can be planted
        return self._writer_class(str(path), purge_step=purge_step,
                                  filename_suffix=f".{secrets.token_hex(8)}")

    def start(self, history: Sequence[StepRecord], loop: Any = None) -> None:
        """Open the run's event file; a resume purges the events from step 0 and draws
        ``history`` again: its records now, their windows' inner steps now with ``loop`` (the
        restored loop), else with the first record (which brings the loop). A run that
        finished before (``finished``: extended, or resumed to hand its report again) is
        purged from its finish's step instead: the steps before it are drawn (that run
        finished with them), and the report at that step is drawn again."""
        self.resumed = self.resumed or bool(history)
        finished = self.finished or {}
        done = finished.get("steps") if finished.get("status") == "finished" else None
        first = done if isinstance(done, int) and 0 <= done <= len(history) else 0
        self.writer = self._writer(self.log_dir, first if self.resumed else None)
        weakref.finalize(self, self.writer.close)  # if no report() closes it
        self.backlog = list(history)
        for record in history:
            if record.step >= first:
                self._draw(record)
        if self.resumed and first == done:  # the purge took that report
            self.drawn_report = (first, self._report_scalars(finished))
        if loop is not None:
            self._draw_backlog(loop)
        self.writer.flush()

    def _draw(self, record: StepRecord) -> None:
        specs = None if self.problem is None else self.problem.hparams
        for key, value in record_tags(record, specs).items():
            self.writer.add_scalar(key, value, record.step)

    def _draw_backlog(self, loop: Any) -> None:
        """Draw the inner steps of the history's kept windows, read with ``loop``."""
        values = (kept_inner_tags(self.problem, loop, self.backlog)
                  if self.problem is not None and self.backlog else {})
        self.backlog = []
        if values:
            self._draw_inner(values)

    def __call__(self, opt: Any, record: StepRecord) -> None:
        if self.writer is None:
            self.start([])
        self._draw(record)
        self.writer.flush()
        values = inner_points(self.problem, opt, self.backlog, record)
        self.backlog = []
        if values:
            self._draw_inner(values)

    def _draw_inner(self, values: Mapping[int, Mapping[str, float]]) -> None:
        """Draw ``values`` (``{t: {tag: value}}``) on the inner run; purged first from step 0
        after a resume (the history's windows are drawn again), or from their first step when
        the run went back to a step drawn already."""
        first = min(values)
        if self.inner is None:
            inner = make_directories(self.log_dir, PurePath("inner"))
            self.inner = self._writer(inner, 0 if self.resumed else None)
        elif first < self.inner_stop:
            purge(self.inner, first)
        for step in sorted(values):
            for key, value in values[step].items():
                self.inner.add_scalar(key, value, step)
        self.inner_stop = max(values) + 1
        self.inner.flush()

    def _report_scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        """The report's metrics at its step (the run's number of steps); returns them."""
        metrics = report_tags(result)
        step = int(result.get("steps", 0))
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        return metrics

    def report(self, result: Mapping[str, Any]) -> None:
        """The final report's metrics (:func:`~hyperdiff.app.tags.report_tags`) at the run's
        last step, and the HParams view: the config's keys and the tuned values against
        them."""
        if self.writer is None:
            self.start([])
        from torch.utils.tensorboard.summary import hparams

        metrics = report_tags(result)
        if self.drawn_report != (int(result.get("steps", 0)), metrics):  # not drawn by start
            self._report_scalars(result)
        tuned = hparam_tags(result.get("tuned", {}).get("hparams", {}),
                            None if self.problem is None else self.problem.hparams)
        for summary in hparams({**self.params, **tuned}, metrics):
            self.writer.file_writer.add_summary(summary, int(result.get("steps", 0)))
        self.close()
        self.writer.close()

    def close(self) -> None:
        """Flush what was drawn and close the inner run's file. The main run's file stays open
        for :meth:`report`, which closes it (else it is closed with the logger): a file opened
        again would be a new one, which TensorBoard may read before the resumed run's purge
        (files of one second are ordered by a counter compared as text), losing the report."""
        if self.writer is not None:
            self.writer.flush()
        if self.inner is not None:
            self.inner.close()


def purge(writer: Any, step: int) -> None:
    """Have TensorBoard drop the events of ``writer``'s run at ``step`` and after, as a
    writer made with ``purge_step=step`` does (a ``SessionLog.START`` event at that step)."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer.file_writer.add_event(Event(step=step,
                                       session_log=SessionLog(status=SessionLog.START)))


def config_loggers(log: Any, run_dir: Path, problem: Problem | None = None,
                   config: Any = None) -> list[Any]:
    """The loggers that a config's ``[log]`` section asks for, with their directories made
    inside ``run_dir`` (:func:`~hyperdiff.app.rundir.paths.inside_run_dir` checks the paths: no
    absolute path, no ``..``, no run file; a symbolic link on the way is refused).
    ``problem``: the task's inner problem; ``config``: the run's, for the params logged.
    Every package is checked before any directory is made. A run directory that holds a run
    already is resumed: its loggers continue what they wrote (also when the run resumes with
    no history, stopped before its first checkpoint)."""
    loggers: list[Any] = []
    params = {} if config is None else run_params(config)
    resumed = RunDir(run_dir).has_run()
    if getattr(log, "mlflow", ""):
        from hyperdiff.app.mlflow_logger import MLflowLogger, check_installed

        check_installed()
    if log.csv:
        csv_path = inside_run_dir(log.csv, "config: log.csv")
        path = make_directories(run_dir, csv_path.parent) / csv_path.name
        refuse_link(path)  # before the run writes anything, not at the first row
        loggers.append(CSVLogger(path, hparams=None if problem is None else problem.hparams))
    if log.tensorboard:
        board = inside_run_dir(log.tensorboard, "config: log.tensorboard")
        # first: is tensorboard installed?
        loggers.append(TensorBoardLogger(run_dir / board, problem=problem, params=params,
                                         finished=RunDir(run_dir).read_result(),
                                         resumed=resumed))
        make_directories(run_dir, board)
    if getattr(log, "mlflow", ""):
        store = make_directories(run_dir, inside_run_dir(log.mlflow, "config: log.mlflow"))
        loggers.append(MLflowLogger(store, problem=problem, params=params, resumed=resumed))
    return loggers


def _takes(method: Callable[..., Any], keyword: str) -> bool:
    """Whether ``method`` takes the keyword argument ``keyword``."""
    try:
        return keyword in inspect.signature(method).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return False


def start_all(callbacks: Iterable[Any], history: Sequence[StepRecord],
              loop: Any = None) -> None:
    """Call every callback's ``start(history)``; with ``loop`` (the restored loop) a
    ``start`` that takes ``loop`` gets it too."""
    for callback in callbacks:
        start = getattr(callback, "start", None)
        if start is None:
            continue
        if loop is not None and _takes(start, "loop"):
            start(history, loop=loop)
        else:
            start(history)


def close_all(callbacks: Iterable[Any], *, failed: bool = False) -> None:
    """Call every callback's ``close()``. ``failed``: the divergence guard gave up; only a
    ``close`` that takes ``failed`` is called, with ``failed=True`` (MLflow marks its run
    failed), before the loop's end closes every callback."""
    for callback in callbacks:
        close = getattr(callback, "close", None)
        if close is None:
            continue
        if not failed:
            close()
        elif _takes(close, "failed"):
            close(failed=True)


def report_all(callbacks: Iterable[Any], result: Mapping[str, Any]) -> None:
    """Hand the run's final result to every callback that defines ``report(result)``."""
    for callback in callbacks:
        if hasattr(callback, "report"):
            callback.report(result)


class Progress:
    """A tqdm bar over one phase of long work, with an ETA, that leaves a one-line summary.

    The bar counts ``unit``s: ``total`` for the phase's loop (``initial`` done already, e.g.
    on resume) and ``report_trainings`` of ``report_unit`` each for the retrainings that
    follow (:meth:`report_phase`), so its ETA includes them. As a callback of an outer loop,
    each record moves it to ``position(loop, record)`` (default: ``record.trainings``, the
    trainings done so far) and shows the step and its loss (selection, else validation).
    Shown only on a terminal unless ``enabled`` says otherwise; ``file``: the stream (tqdm's
    default, stderr). On :meth:`close` it stays on screen as ``"DESC done: ..."``.
    """

    def __init__(self, *, total: int, initial: int = 0, report_trainings: int = 0,
                 enabled: bool | None, desc: str = "", unit: str = "training",
                 report_unit: int = 1,
                 position: Callable[[Any, StepRecord], int] | None = None,
                 file: Any = None):
        from tqdm.auto import tqdm

        self.report, self.report_unit, self.desc = report_trainings, report_unit, desc
        self.position = position or (lambda loop, record: record.trainings)
        self.bar = tqdm(total=total + report_trainings * report_unit, initial=initial,
                        unit=unit, desc=desc, disable=None if enabled is None else not enabled,
                        leave=True, file=file)
        self.steps = 0
        self.best: float | None = None

    def __call__(self, opt: Any, record: StepRecord) -> None:
        self.advance(self.position(opt, record) - self.bar.n)
        self.steps += 1
        loss = record.selection_loss if record.selection_loss is not None else record.val_loss
        if loss is not None:
            self.best = loss if self.best is None else min(self.best, loss)
            self.bar.set_postfix(step=record.step, loss=f"{loss:.4g}", refresh=False)

    def advance(self, units: int) -> None:
        """Move the bar by ``units`` (a search's trial: its trainings)."""
        self.bar.update(units)

    def report_phase(self) -> Callable[[], None]:
        """Shrink the total to what is left (early stops end before the budget); return the
        per-training tick of the retrainings."""
        self.bar.total = self.bar.n + self.report * self.report_unit
        self.bar.set_description_str(f"{self.desc} final report".strip())
        self.bar.refresh()
        return lambda: self.bar.update(self.report_unit)

    def close(self, **summary: Any) -> None:
        """Leave the bar as the phase's summary: ``"DESC done"``, the steps and the best loss
        seen (or ``summary``'s entries)."""
        if not summary and self.best is not None:
            summary = {**({"steps": self.steps} if self.steps else {}),
                       "best loss": f"{self.best:.4g}"}
        self.bar.set_description_str(f"{self.desc} done".strip())
        if summary:
            self.bar.set_postfix(summary, refresh=False)
        self.bar.close()
