"""Immutable per-step records of the outer loop, the history that collects them, the result.

One :class:`StepRecord` per outer step ``s``: the hyperparameters ``lam_s`` it evaluated (natural
units), the losses at ``theta_T(lam_s)`` and the mean hypergradient (raw units) that moved
``lam_s`` to ``lam_{s+1}``. Records round-trip through JSON lines exactly (floats are written with
``repr``), which the run directory relies on to resume a run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from hyperdiff.hparams.hyperparams import HyperParameters

TIMING_FIELDS = ("time_s", "step_time_s")
_JSON_LINE = "_json_line"  # where a record keeps its JSON line once written


@dataclass(frozen=True)
class StepRecord:
    """What happened at one outer step.

    Attributes:
        step: outer step index ``s`` (0-based).
        hparams: natural values ``lam_s``: a float per scalar, a list per vector (``None``
            for a value that is not finite, which only a failed step can hold).
        status: ``"ok"``, or ``"failed"`` when training diverged, a loss or the hypergradient
            was not finite, a loss was absurdly large, or ``lam_s`` left its constraint (see
            :mod:`hyperdiff.tuner.guard`; then ``lam`` was restored to the last good value).
        train_loss, val_loss: means over the step's trainings (seeds x folds).
        val_loss_std: their standard deviation (0 for one training).
        selection_loss: loss on the selection split (``None`` without one).
        grad_norm: L2 norm of the mean raw hypergradient.
        grad_std: L2 norm of the per-coordinate standard deviation of the hypergradients of
            the step's trainings (``None`` for one training): the spread of the estimate.
        grad: mean raw hypergradient by name (``dL/du``, ``u`` the raw value).
        lr: outer learning rate of the update that followed; on a step no update follows
            (``grad`` None: a global phase's plain point, an online window trained plainly
            after settling, a failed step) the rate the loop was at, which the next update
            would have used.
        best: this step is the best so far (by selection loss, else validation loss).
        trainings: inner trainings done so far (cumulative).
        message: what the divergence guard did, if anything.
        time_s, step_time_s: wall time since the start of the run, and of this step.
        grad_snr: signal-to-noise ratio of the mean hypergradient over its samples,
            ``||mean|| / (||std|| / sqrt(n))`` (:mod:`hyperdiff.tuner.snr`); ``None`` with one
            sample, for a failed step, or when the samples agree exactly.
        samples: the number of samples ``n`` averaged (``None`` for a failed step).
        discrete: for discrete hyperparameters (:mod:`hyperdiff.hparams.discrete`): the
        temperatures,
            REINFORCE's samples, baselines and estimate variance (``None`` without any).
    """

    step: int
    hparams: dict[str, Any]
    status: str
    train_loss: float | None
    val_loss: float | None
    val_loss_std: float | None
    selection_loss: float | None
    grad_norm: float | None
    grad_std: float | None
    grad: dict[str, Any] | None
    lr: float
    best: bool
    trainings: int
    message: str
    time_s: float
    step_time_s: float
    grad_snr: float | None = None
    samples: int | None = None
    discrete: dict[str, Any] | None = None

    @property
    def criterion(self) -> float | None:
        """The loss that ranks steps: selection loss if there is one, else validation loss."""
        return self.val_loss if self.selection_loss is None else self.selection_loss

    def to_json(self) -> str:
        """The record as one JSON line (``json.dumps`` of its fields, floats by ``repr``).

        Written once and kept: a record is immutable, and the run directory's history and
        every online checkpoint (which holds all records so far) write it, so a run of W
        windows serialized ``W (W + 1) / 2`` records before. The fields go to ``json.dumps``
        as they are, without ``asdict``'s deep copy (the same text: they are JSON values).
        """
        line = self.__dict__.get(_JSON_LINE)
        if line is None:
            line = json.dumps({f.name: getattr(self, f.name) for f in fields(self)},
                              allow_nan=False)
            object.__setattr__(self, _JSON_LINE, line)
        return line

    @classmethod
    def from_json(cls, line: str) -> StepRecord:
        """Parse one JSON line (unknown keys are ignored).

        Raises:
            ValueError: invalid JSON, or a field missing or of the wrong JSON type.
        """
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError(f"a record must be a JSON object (got {type(data).__name__})")
        required = [f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"the record lacks the field(s) {', '.join(missing)}")
        present = [f for f in fields(cls) if f.name in data]
        for f in present:
            if not _json_type_fits(data[f.name], str(f.type)):
                raise ValueError(f"field {f.name!r} must be {f.type} (got {data[f.name]!r:.60})")
        return cls(**{f.name: data[f.name] for f in present})

    def without_timing(self) -> dict[str, Any]:
        """The record as a dict without wall-time fields (for comparing runs)."""
        return {k: v for k, v in asdict(self).items() if k not in TIMING_FIELDS}


class History(Sequence[StepRecord]):
    """An append-only sequence of :class:`StepRecord` with column access."""

    def __init__(self, records: Sequence[StepRecord] = ()):
        self._records = list(records)

    def __getitem__(self, index):  # type: ignore[override]
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self._records)

    def append(self, record: StepRecord) -> None:
        self._records.append(record)

    def column(self, name: str) -> list[Any]:
        """One field of every record, e.g. ``history.column("val_loss")``."""
        return [getattr(r, name) for r in self._records]

    def best(self) -> StepRecord | None:
        """The record marked best last (``None`` before a successful step)."""
        marked = [r for r in self._records if r.best]
        return marked[-1] if marked else None


@dataclass(frozen=True)
class OptimizeResult:
    """The outcome of :meth:`hyperdiff.tuner.driver.HyperOptimizer.run`.

    Attributes:
        best_raw: raw values of the best hyperparameters seen; ``best_hparams`` holds them.
        best_step: the step that evaluated them; ``best_loss`` its criterion value. With
            ``criterion="final values"`` (a meta run without validation tasks) the values
            after the last step's update, which no step evaluated: ``best_step`` is the
            number of steps and ``best_loss`` NaN.
        criterion: ``"selection_loss"``, ``"val_loss"``, or the tied form (val loss for the
            tied steps, then selection loss; see :mod:`hyperdiff.tuner.stopping`).
        final_raw: raw values after the last update.
        history: every step's record.
        stop_reason: why the loop ended (budget, time, early stopping, convergence).
    """

    best_raw: dict[str, Tensor]
    best_hparams: HyperParameters
    best_step: int
    best_loss: float
    criterion: str
    final_raw: dict[str, Tensor]
    history: History
    stop_reason: str

    @property
    def steps(self) -> int:
        return len(self.history)


def natural_values(hparams: HyperParameters, raw: dict[str, Tensor]) -> dict[str, Any]:
    """Natural values as JSON-ready numbers: a float per scalar, a list per vector."""
    return {name: to_number(v) for name, v in hparams.natural(raw).items()}


def to_number(value: Tensor) -> float | list[float | None] | None:
    """A float per scalar, a list per vector; ``None`` where a value is not finite (JSON has
    no inf or NaN: only a failed step can hold such a value)."""
    value = value.detach().double()
    if value.dim() == 0:
        return finite_or_none(float(value))
    numbers = value.reshape(-1).tolist()
    if bool(torch.isfinite(value).all()):  # one check for the whole vector (500 penalties)
        return numbers
    return [finite_or_none(v) for v in numbers]


def _json_type_fits(value: Any, annotation: str) -> bool:
    """Does a JSON value fit a field annotated ``int``, ``float | None``, ``dict[...]``, ...?"""
    if value is None:
        return annotation.endswith("| None")
    base = annotation.split("[")[0].split("|")[0].strip()
    if base == "bool":
        return isinstance(value, bool)
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    kinds: dict[str, type] = {"str": str, "dict": dict, "list": list}
    return base not in kinds or isinstance(value, kinds[base])


def finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


__all__ = ["History", "OptimizeResult", "StepRecord"]
