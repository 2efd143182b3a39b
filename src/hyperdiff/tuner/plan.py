"""The contract between the one outer loop and its plans: what one outer step trains.

:class:`~hyperdiff.tuner.driver.HyperOptimizer` owns everything that every outer loop does once
(the raw values and the outer optimizer, its learning-rate schedule, clipping and normalizing,
the divergence guard with its snapshots, stopping and the best step, records, callbacks,
progress, the clock, the checkpoint, the discrete hooks). A *plan* says what one outer step
trains and what it hands back::

    plan.bind(loop)                       once: check the problems and the method, make state
    outcome = plan.evaluate(loop, s, u)   train at raw values u: the step's hypergradient
                                          (float64, by name), its losses, its record fields
    plan.selection_loss(loop, outcome)    after the outer update (None: no selection split)
    plan.commit(loop, outcome, record)    the guard passed: keep the trained state
    plan.snapshot() / plan.restore(good)  the plan's part of the guard's snapshot
    plan.state_dict(loop) / plan.load_state_dict(loop, state, history)   its checkpoint part

- :class:`~hyperdiff.tuner.offline_plan.OfflinePlan`: every outer step retrains ``[0, T)``
  for every problem (fold) x sample, from theta_0 or the slot's warm start.
- :class:`~hyperdiff.tuner.online_plan.OnlinePlan`: one training; outer step ``h`` is the
  window ``[t, t+K)`` from the current training state with the method's carry.

Every training of a plan goes through the configured method (``method(problem, raw)``
offline, ``method.segment(...)`` online), so a method that wraps another (data-parallel) works
in every plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

from torch import Tensor

from hyperdiff.errors import HyperdiffError


class Outcome(NamedTuple):
    """What one outer step's trainings give the loop.

    Attributes:
        grad: the raw hypergradient ``g_s`` the outer update follows, float64, by name;
            ``None``: no outer update (an online window after the values settled).
        values: the validation losses the guard checks (one per training).
        fields: the record's own fields of the plan (``train_loss``, ``val_loss``,
            ``val_loss_std``, ``grad_norm``, ``grad_std``, ``grad``, ``grad_snr``,
            ``samples``, ``discrete``).
        untrained: the untrained model's losses (``{"validation": U, "selection": U_sel}``),
            the guard's reference at the first step; called only then.
        kept: what :meth:`Plan.commit` keeps (the trained state of an online window).
        step_rule: ``rule(before, after) -> kept``: the raw values the loop keeps after its
            outer step from ``before`` to ``after`` (by name); None keeps ``after`` (online
            with ``lowering < 1``: a move that lowers the learning rate is shortened,
            :mod:`hyperdiff.tuner.lowering`).
    """

    grad: dict[str, Tensor] | None
    values: list[float]
    fields: dict[str, Any]
    untrained: Callable[[], Mapping[str, float]]
    kept: Any = None
    step_rule: Callable[[dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor]] | None = None


class Plan(Protocol):
    """What an outer loop's plan provides (module doc)."""

    caller: str  # names the loop in messages
    flat_leaf: bool  # the outer optimizer steps one flat leaf (True) or one leaf per name
    optimizer_key: str  # the outer optimizer's entry in checkpoints and guard snapshots
    ranks: bool  # the loop ranks steps (best step, early stopping, convergence)
    reads_chaos: bool  # its ranking passes over chaotic steps (Stopping.chaos_ratio)
    zero_lr: bool  # an outer learning rate of 0 is allowed (hypergradients measured only)
    optimizers: tuple[str, ...]  # the outer optimizers it takes, by name
    default_optimizer: str  # the one HyperOptimizer(optimizer=None) uses

    def bind(self, loop: Any) -> None: ...

    def schedule_position(self, loop: Any, step: int) -> tuple[float, int]: ...

    def stop_reason(self, loop: Any) -> str | None: ...

    def where(self, loop: Any) -> str: ...

    def trainings(self, loop: Any) -> int: ...

    def begin(self, loop: Any, step: int) -> dict[str, Tensor]: ...

    def evaluate(self, loop: Any, step: int, raw: dict[str, Tensor]) -> Outcome: ...

    def selection_loss(self, loop: Any, outcome: Outcome) -> float | None: ...

    def commit(self, loop: Any, outcome: Outcome, record: Any) -> Any: ...

    def failure_note(self, loop: Any, message: str) -> str: ...

    def rescue_start(self, loop: Any) -> bool: ...

    def counts_failure(self, loop: Any) -> bool: ...

    def give_up_advice(self, loop: Any, raw: dict[str, Tensor]) -> str: ...

    def outer_options(self, optimizer: str) -> dict[str, Any]: ...

    def snapshot(self) -> dict[str, Any]: ...

    def restore(self, good: dict[str, Any]) -> None: ...

    def state_dict(self, loop: Any) -> dict[str, Any]: ...

    def load_state_dict(self, loop: Any, state: dict[str, Any], history: Any) -> list[Any]: ...

    def result(self, loop: Any) -> Any: ...


def bind_once(plan: Any, loop: Any) -> None:
    """Mark ``plan`` as ``loop``'s: a plan holds one run's state (warm slots, a training), so a
    second loop must get a plan of its own."""
    owner = getattr(plan, "_loop_id", None)
    if owner is not None and owner != id(loop):
        raise HyperdiffError(f"{plan.caller}: plan must be a new {type(plan).__name__} for "
                             "each HyperOptimizer (it holds one run's state; got one already "
                             "given to another)")
    plan._loop_id = id(loop)


__all__ = ["Outcome", "Plan", "bind_once"]
