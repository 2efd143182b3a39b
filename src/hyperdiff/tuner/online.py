"""``OnlineTuner``: the online tuner's old spelling, a thin deprecated shim for one release.

Use ``HyperOptimizer(problem, plan=hd.plans.OnlinePlan(window=K, ...), method=hd.forward())``
(:mod:`hyperdiff.tuner.online_plan`): the one outer loop with the online plan. The shim maps
its method name and flat options (``engine``, ``solver``, ``backprop``, ``horizon``, ...) to a
configured :class:`~hyperdiff.methods.base.Method` (:mod:`hyperdiff.methods.window_methods`,
with the online solvers' defaults ``cg(maxiter=50)`` / ``neumann(iterations=20)``) and its
other arguments to the plan and the loop; its result is the online plan's
:class:`~hyperdiff.tuner.online_plan.OnlineResult` (final values and the trained model).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.solvers import Solver
from hyperdiff.engine.training import TrainState
from hyperdiff.errors import HyperdiffError, fail
from hyperdiff.methods.window_methods import online_methods, window_method
from hyperdiff.tuner.driver import HyperOptimizer, schedule_factor
from hyperdiff.tuner.online_plan import OnlinePlan, OnlineResult
from hyperdiff.typing import Batch

METHODS = tuple(online_methods())
"""The method names the tuner takes (registered methods whose capabilities say online)."""
DEPRECATED = ("hd.online.OnlineTuner is deprecated; use hd.HyperOptimizer(problem, "
              "plan=hd.plans.OnlinePlan(window=...), method=...)")


def _from_plan(name: str) -> Any:
    """A read-only attribute of the old tuner, now its online plan's ``name``."""
    return property(lambda self: getattr(self.plan, name), doc=f"The online plan's {name}.")


class _TunerPlan(OnlinePlan):
    """The online plan under the old tuner's name in messages."""

    caller = "OnlineTuner"


class OnlineTuner(HyperOptimizer):
    """Deprecated: ``HyperOptimizer(problem, plan=OnlinePlan(window, val_batch_size,
    eval_every, hot_start), method=<the named method with the options>, ...)`` (module doc).

    The defaults are the old tuner's: ``lr=0.01``, ``schedule="constant"``, ``window=1``.
    """

    def __init__(self, problem: Problem, *, window: int = 1, method: str = "reverse",
                 optimizer: str = "adam", lr: float = 0.01, schedule: str = "constant",
                 clip: float | None = None,
                 val_batch_size: int | None = None, selection: Batch | list[Batch] | None = None,
                 eval_every: int = 0, seed: int = 0, engine: str = "double_vjp",
                 solver: Solver | str = "cg", backprop: int | None = None,
                 shrink: float = 0.5, max_failures: int = 5, max_loss_ratio: float = 1e6,
                 normalize: bool = False, horizon: float | None = 500,
                 horizon_unit: str = "steps", curvature_scale: float | None = None,
                 hot_start: str | None = None):
        warnings.warn(DEPRECATED, DeprecationWarning, stacklevel=2)
        if not isinstance(problem, Problem):
            raise fail("OnlineTuner", "problem", "a hd.Problem made by hd.make_problem", problem)
        configured = window_method(method, problem, engine=engine, solver=solver,
                                   backprop=backprop, horizon=horizon,
                                   horizon_unit=horizon_unit, curvature_scale=curvature_scale)
        super().__init__(
            problem, plan=_TunerPlan(window=window, val_batch_size=val_batch_size,
                                     eval_every=eval_every, hot_start=hot_start),
            method=configured, optimizer=optimizer, lr=lr, schedule=schedule, clip=clip,
            normalize=normalize, selection=selection, seed=seed, shrink=shrink,
            max_failures=max_failures, max_loss_ratio=max_loss_ratio)
        self.method = method  # the name, as the old tuner held it (the plan holds the Method)
        self.engine, self.solver = engine, configured.options.get("solver")
        self.backprop = configured.options.get("k")

    # the old tuner's attributes, read from its plan and loop
    window = _from_plan("window")
    window_method = _from_plan("method")
    problem = _from_plan("problem")
    state = _from_plan("state")
    tangent = _from_plan("tangent")
    inner_step = _from_plan("inner_step")
    hot_start = _from_plan("hot_start")
    hot_start_measure = _from_plan("hot_start_measure")
    restarted = _from_plan("restarted")
    warnings = _from_plan("warnings")
    val_batch_size = _from_plan("val_batch_size")

    @property
    def online(self) -> OnlinePlan:
        assert isinstance(self.plan, OnlinePlan)
        return self.plan

    @property
    def flat(self) -> Tensor:
        """The one flat leaf of all raw values that the outer optimizer steps."""
        return self.leaves[0]

    @property
    def hyper_step(self) -> int:
        return len(self.history)

    def val_batches(self, hyper_step: int) -> list[Batch]:
        return self.online.val_batches(self.seed, hyper_step)

    def outer_lr(self, window: int) -> float:
        """The outer learning rate of the run's window ``w``."""
        return self.lr * self.guard.scale * schedule_factor(self.schedule, window,
                                                            self.online.windows)

    def selection_loss(self, state: TrainState | None = None) -> float:
        """The validation loss on the selection batches at the current parameters (or at
        ``state``'s)."""
        if self.selection is None:
            raise HyperdiffError("OnlineTuner.selection_loss: the tuner was made without "
                                 "selection batches (got selection=None)")
        return self.online.selection_at(self, self.state if state is None else state)


__all__ = ["METHODS", "OnlineResult", "OnlineTuner"]
