"""What one online run holds: the attributes of an :class:`~hyperdiff.tuner.online.OnlineTuner`
that its hot start (:mod:`hyperdiff.tuner.hot_start`) and its checkpoint
(:mod:`hyperdiff.tuner.online_checkpoint`) read and set.

Those two modules sit below :mod:`hyperdiff.tuner.online`, which calls them, so they name the
tuner by this protocol instead of importing it.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import TrainState
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.methods.base import Method
from hyperdiff.tuner.guard import DivergenceGuard
from hyperdiff.tuner.history import History


class OnlineRun(Protocol):
    """An online tuner's state: its problem and options, the inner training (``state``,
    ``inner_step``, ``tangent``), the outer optimizer over one flat leaf of raw values
    (``flat``, ``optimizer``), the guard, the hot-start measure and the history."""

    problem: Problem
    method: str
    window: int
    window_method: Method
    hot_start: str
    hot_start_measure: tuple[int, float] | None
    restarted: bool
    guard: DivergenceGuard
    hparams: HyperParameters
    flat: Tensor
    optimizer: Any
    state: TrainState
    tangent: Any
    inner_step: int
    history: History
    _elapsed: float

    @property
    def raw(self) -> dict[str, Tensor]: ...

    @property
    def hyper_step(self) -> int: ...


__all__ = ["OnlineRun"]
