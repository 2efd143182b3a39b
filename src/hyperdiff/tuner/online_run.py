"""What one online run holds: the state of an :class:`~hyperdiff.tuner.online_plan.OnlinePlan`
and the parts of its loop that its hot start (:mod:`hyperdiff.tuner.hot_start`) and its
checkpoint (:mod:`hyperdiff.tuner.online_checkpoint`) read and set.

Those two modules sit below :mod:`hyperdiff.tuner.online_plan` and
:mod:`hyperdiff.tuner.driver`, which call them, so they name the plan and the loop by these
protocols instead of importing them.
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
    """An online plan's state: its problem, method and window, the inner training
    (``state``, ``inner_step``, ``tangent``) and the hot-start measure."""

    caller: str  # names the loop in messages ("HyperOptimizer"; the shim's "OnlineTuner")
    problem: Problem
    label: str  # the method's name in checkpoints and reports
    window: int
    growth: float  # windows of K + floor(growth * t) steps (tuner/windows.py)
    samples: int  # validation samples per window
    schedule_over: str  # the outer lr's cosine over the run's "windows" or inner "steps"
    lowering: float  # the kept fraction of an outer move that lowers the learning rate
    val_batch_size: int | None  # rows of each sample's validation batch (None: all)
    method: Method
    hot_start: str
    hot_start_measure: tuple[int, float] | None
    restarted: bool
    state: TrainState
    tangent: Any
    inner_step: int
    span: tuple[int, int]  # the current window's steps [start, stop)
    rescue: int  # the most learning-rate cuts of a broken start (tuner/online_rescue.py)
    rescues: int  # the cuts made so far
    retry: int  # the most tries of a weak or hot start (tuner/online_retry.py)
    retries: int  # those made so far: +k warmer, -k cooler
    pending_retry: dict[str, Tensor] | None  # the next try's raw values, within one step
    settled_at: int | None  # where the plain windows began (tuner/settling.py); None: tuning


class Loop(Protocol):
    """The parts of the outer loop (:class:`~hyperdiff.tuner.driver.HyperOptimizer`) that the
    online plan's helpers read: the raw values, the outer optimizer, the guard, the history."""

    hparams: HyperParameters
    seed: int
    guard: DivergenceGuard
    optimizer: Any
    history: History

    @property
    def raw(self) -> dict[str, Tensor]: ...

    def set_raw(self, raw: dict[str, Tensor]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...


__all__ = ["Loop", "OnlineRun"]
