"""Watching long work: per-step loggers (CSV, TensorBoard), the callback hook, progress.

A *callback* is any callable ``callback(optimizer, record)``: the
:class:`~hyperdiff.HyperOptimizer` and the :class:`~hyperdiff.tuner.history.StepRecord` of the outer
step that just ended (successful or failed). Pass callbacks to ``HyperOptimizer.run(callbacks=...)``
or ``hyperdiff.app.experiment.run_experiment(..., callbacks=...)``; that is the hook for MLflow,
Weights & Biases or anything else::

    def to_mlflow(opt, record):
        mlflow.log_metrics(scalars(record), step=record.step)

A callback may also define ``start(history)`` (called once before the first step, with the
records of a resumed run) and ``close()`` (called when the run ends). :class:`CSVLogger` and
:class:`TensorBoardLogger` are such callbacks; ``[log] csv`` and ``[log] tensorboard`` in a
config switch them on for ``hyperdiff run``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from hyperdiff.app.rundir.files import (
    append_bytes,
    atomic_write_bytes,
    os_errors,
    refuse_link,
    remove_temporaries,
)
from hyperdiff.app.rundir.paths import inside_run_dir, make_directories
from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.tuner.history import StepRecord

LOSS_FIELDS = ("train_loss", "val_loss", "val_loss_std", "selection_loss", "grad_norm",
               "grad_std", "grad_snr", "lr")
CSV_FIELDS = ("step", "status", *LOSS_FIELDS, "best", "trainings", "samples", "time_s",
              "step_time_s", "message")


def scalars(record: StepRecord) -> dict[str, float]:
    """The record's numbers by name: losses, hypergradient norm and signal-to-noise ratio,
    outer lr, and each hyperparameter (a scalar as ``hparams/NAME``, a vector as
    ``hparams/NAME/mean``, ``/min``, ``/max``); ``None`` values are left out."""
    out = {k: float(getattr(record, k)) for k in LOSS_FIELDS if getattr(record, k) is not None}
    return {**out, **hparam_scalars(record)}


def hparam_scalars(record: StepRecord) -> dict[str, float]:
    """``hparams/NAME`` (a scalar) or ``hparams/NAME/mean|min|max`` (a vector)."""
    out = {}
    for name, value in record.hparams.items():
        if isinstance(value, list):
            out[f"hparams/{name}/mean"] = sum(value) / len(value)
            out[f"hparams/{name}/min"] = float(min(value))
            out[f"hparams/{name}/max"] = float(max(value))
        else:
            out[f"hparams/{name}"] = float(value)
    return out


def log_path(caller: str, name: str, value: Any) -> Path:
    """``value`` as a :class:`~pathlib.Path`, refused unless it is a non-empty str or path."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise HyperdiffError(f"{caller}: {name} must be a non-empty path (a str or "
                             f"os.PathLike; got {describe(value)})")
    return Path(value)


class CSVLogger:
    """One CSV row per outer step: the record's fields (``CSV_FIELDS``) and, for each
    hyperparameter, its value (a vector's mean, min and max). Floats are written with
    ``repr`` so that they read back exactly; ``None`` is an empty cell. On resume the file is
    rewritten from the history first, so its rows always equal the history. The file is
    written as run files are (:mod:`hyperdiff.app.rundir.files`): replaced atomically at the start,
    appended after, never through a symbolic link."""

    def __init__(self, path: str | Path):
        self.path = log_path("CSVLogger", "path", path)
        self.columns: list[str] | None = None

    def start(self, history: Sequence[StepRecord]) -> None:
        with os_errors(self.path.parent, "create the directory"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.path.parent, (self.path.name,))
        self.columns = None
        atomic_write_bytes(self.path, b"".join(self._line(r) for r in history),
                           sync_directory=False)

    def __call__(self, opt: Any, record: StepRecord) -> None:
        if self.columns is None and not self.path.exists():
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

    @staticmethod
    def row(record: StepRecord) -> dict[str, Any]:
        return {**{k: getattr(record, k) for k in CSV_FIELDS}, **hparam_scalars(record)}

    def close(self) -> None:
        pass


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


class TensorBoardLogger:
    """Scalars of every outer step (:func:`scalars`) through
    ``torch.utils.tensorboard.SummaryWriter``, at ``global_step = record.step``."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = log_path("TensorBoardLogger", "log_dir", log_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise HyperdiffError(
                "log: tensorboard must be installed to write TensorBoard logs (pip install "
                f"'hyperdiff[tensorboard]'); got ImportError: {err}"
            ) from None
        self._writer_class = SummaryWriter
        self.writer: Any = None

    def start(self, history: Sequence[StepRecord]) -> None:
        # purge events past the resume point so a resumed run shows one curve; a random
        # suffix makes the event file's name unguessable, so no link can be planted there
        self.writer = self._writer_class(str(self.log_dir), purge_step=len(history) or None,
                                         filename_suffix=f".{secrets.token_hex(8)}")

    def __call__(self, opt: Any, record: StepRecord) -> None:
        if self.writer is None:
            self.start([])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record.step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def config_loggers(log: Any, run_dir: Path) -> list[Any]:
    """The loggers that a config's ``[log]`` section asks for, with their directories made
    inside ``run_dir`` (:func:`~hyperdiff.app.rundir.paths.inside_run_dir` checks the paths: no
    absolute path, no ``..``, no run file; a symbolic link on the way is refused)."""
    loggers: list[Any] = []
    if log.csv:
        csv_path = inside_run_dir(log.csv, "config: log.csv")
        path = make_directories(run_dir, csv_path.parent) / csv_path.name
        refuse_link(path)  # before the run writes anything, not at the first row
        loggers.append(CSVLogger(path))
    if log.tensorboard:
        board = inside_run_dir(log.tensorboard, "config: log.tensorboard")
        loggers.append(TensorBoardLogger(run_dir / board))  # first: is tensorboard installed?
        make_directories(run_dir, board)
    return loggers


def start_all(callbacks: Iterable[Any], history: Sequence[StepRecord]) -> None:
    for callback in callbacks:
        if hasattr(callback, "start"):
            callback.start(history)


def close_all(callbacks: Iterable[Any]) -> None:
    for callback in callbacks:
        if hasattr(callback, "close"):
            callback.close()


class Progress:
    """A tqdm bar over a whole ``hyperdiff run``: one unit per inner training, those of the
    outer steps (``record.trainings``, cumulative; the ``steps - done`` steps to come are
    counted at ``units_per_step`` each, the fewest with ``samples="auto"``) and those of the
    final report, so its total and ETA include the report. Shown only on a terminal unless
    ``enabled`` says otherwise; stays on screen."""

    def __init__(self, *, steps: int, done: int, units_per_step: int, report_trainings: int,
                 enabled: bool | None, desc: str = "", trainings: int | None = None):
        from tqdm.auto import tqdm

        self.report, self.desc = report_trainings, desc
        self.trainings = done * units_per_step if trainings is None else trainings
        self.bar = tqdm(total=self.trainings + (steps - done) * units_per_step
                        + report_trainings,
                        initial=self.trainings, unit="training", desc=desc,
                        disable=None if enabled is None else not enabled, leave=True)

    def __call__(self, opt: Any, record: StepRecord) -> None:
        self.bar.update(record.trainings - self.trainings)
        self.trainings = record.trainings
        if record.selection_loss is not None or record.val_loss is not None:
            loss = record.selection_loss if record.selection_loss is not None else record.val_loss
            self.bar.set_postfix(step=record.step, loss=f"{loss:.4g}", refresh=False)

    def report_phase(self) -> Callable[[], None]:
        """Shrink the total to what is left (early stops end before the budget); return the
        per-training tick of the report."""
        self.bar.total = self.bar.n + self.report
        self.bar.set_description_str(f"{self.desc} final report".strip())
        self.bar.refresh()
        return lambda: self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
