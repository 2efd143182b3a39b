"""The window hypergradients of online tuning by name, with their options checked.

:func:`window_method` turns the :class:`~hyperdiff.tuner.online.OnlineTuner`'s ``method`` and
its options into a :class:`WindowMethod`, one callable with the contract of the window
functions: ``method(problem, state, raw, start, stop, val_batches, tangent) -> Window``
(``tangent`` is what the method carries across windows, ``None`` at the start of the run):

- ``"reverse"``: :func:`~hyperdiff.methods.windows.reverse_window` (option ``backprop``);
- ``"forward"``: :func:`~hyperdiff.methods.windows.forward_window` (option ``engine``);
- ``"implicit"``: :func:`~hyperdiff.methods.windows.implicit_window` (option ``solver``);
- ``"curvature"``: :func:`~hyperdiff.methods.curvature.curvature_window` (options ``horizon``,
  ``horizon_unit``, ``curvature_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.solvers import Solver, cg, neumann
from hyperdiff.engine.training import TrainState
from hyperdiff.errors import fail, positive_float, positive_int
from hyperdiff.methods.curvature import (
    HORIZON_UNITS,
    check_optimizer,
    curvature_window,
    initial_tangent,
)
from hyperdiff.methods.forward import ENGINES
from hyperdiff.methods.windows import Window, forward_window, implicit_window, reverse_window
from hyperdiff.typing import Batch

METHODS = ("reverse", "forward", "implicit", "curvature")
DEFAULT_HORIZON = 500


@dataclass(frozen=True)
class WindowMethod:
    """A window hypergradient and its options (only its own are set)."""

    name: str
    engine: str = "double_vjp"
    solver: Solver | None = None
    backprop: int | None = None
    horizon: float | None = DEFAULT_HORIZON
    horizon_unit: str = "steps"
    curvature_scale: float | None = None

    def __call__(self, problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                 stop: int, val_batches: list[Batch], tangent: Any) -> Window:
        if self.name == "reverse":
            return reverse_window(problem, state, raw, start, stop, val_batches, self.backprop)
        if self.name == "forward":
            return forward_window(problem, state, raw, start, stop, val_batches, tangent,
                                  engine=self.engine)
        if self.name == "curvature":
            return curvature_window(problem, state, raw, start, stop, val_batches, tangent,
                                    horizon=self.horizon, horizon_unit=self.horizon_unit,
                                    scale=self.curvature_scale)
        assert self.solver is not None  # set by window_method for "implicit"
        return implicit_window(problem, state, raw, start, stop, val_batches, self.solver)

    def tangent_like(self, problem: Problem, raw: dict[str, Tensor], state: TrainState) -> Any:
        """A carried tangent of the right structure (for restoring a saved one)."""
        return initial_tangent(problem, raw) if self.name == "curvature" else state


def window_method(name: str, problem: Problem, *, engine: str = "double_vjp",
                  solver: Solver | str = "cg", backprop: int | None = None,
                  horizon: float | None = DEFAULT_HORIZON, horizon_unit: str = "steps",
                  curvature_scale: float | None = None) -> WindowMethod:
    """The :class:`WindowMethod` called ``name``; options of other methods must keep their
    defaults (raises :class:`~hyperdiff.errors.HyperdiffError` naming the bad one)."""
    if name not in METHODS:
        raise fail("OnlineTuner", "method", f"one of {list(METHODS)}", name)
    if engine not in ENGINES or engine == "auto":
        raise fail("OnlineTuner", "engine", "'double_vjp' or 'jvp'", engine)
    checked = _solver(solver)
    if backprop is not None:
        backprop = positive_int("OnlineTuner", "backprop", backprop)
        if name != "reverse":
            raise fail("OnlineTuner", "backprop", "None unless method='reverse'", backprop)
    if name != "curvature" and (horizon != DEFAULT_HORIZON or curvature_scale is not None
                                or horizon_unit != "steps"):
        raise fail("OnlineTuner", "horizon / horizon_unit / curvature_scale",
                   "their defaults unless method='curvature'",
                   (horizon, horizon_unit, curvature_scale))
    if horizon_unit not in HORIZON_UNITS:
        raise fail("OnlineTuner", "horizon_unit", f"one of {list(HORIZON_UNITS)}", horizon_unit)
    if name == "curvature":
        check_optimizer(problem)
    if horizon is not None:
        horizon = (positive_int("OnlineTuner", "horizon", horizon) if horizon_unit == "steps"
                   else positive_float("OnlineTuner", "horizon", horizon))
    if curvature_scale is not None:
        curvature_scale = float(curvature_scale if curvature_scale == 0 else positive_float(
            "OnlineTuner", "curvature_scale", curvature_scale))
    return WindowMethod(name, engine=engine, solver=checked, backprop=backprop, horizon=horizon,
                        horizon_unit=horizon_unit, curvature_scale=curvature_scale)


def _solver(solver: Solver | str) -> Solver:
    if isinstance(solver, Solver):
        return solver
    if solver == "cg":
        return cg(maxiter=50)
    if solver == "neumann":
        return neumann(iterations=20)
    raise fail("OnlineTuner", "solver",
               "a hd.solvers.cg() / hd.solvers.neumann() Solver, 'cg' or 'neumann'", solver)


__all__ = ["METHODS", "WindowMethod", "window_method"]
