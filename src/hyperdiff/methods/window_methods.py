"""The deprecated ``OnlineTuner``'s method name and flat options -> a configured ``Method``.

For the shim's last release; the CLI and ``HyperOptimizer`` take a configured method
(``app/plans.py``'s ``configured_method``).

A thin lookup through the registry (:mod:`hyperdiff.methods.registry`): the names are the
methods whose capabilities say ``online`` and whose constructor needs no argument; the
tuner's options are checked here with its name as the caller and passed to the method's own
constructor. ``backprop=k`` with ``"reverse"`` is :func:`~hyperdiff.methods.truncated.truncated`
``(k)``, whose segment is reverse mode's over the last k steps.
"""

from __future__ import annotations

import inspect
from typing import Any

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.solvers import Solver, cg, neumann
from hyperdiff.errors import HyperdiffError, fail, positive_int
from hyperdiff.methods.base import Method
from hyperdiff.methods.curvature import curvature_options
from hyperdiff.methods.forward import ENGINES
from hyperdiff.methods.registry import methods_where, registered_constructor

DEFAULT_HORIZON = 500


def online_methods() -> list[str]:
    """The names the online tuner takes: online methods built without arguments (not
    ``truncated``, whose options all default to None but which needs ``k`` or a fraction)."""
    return [name for name in methods_where(online=True) if _builds_bare(name)]


def _builds_bare(name: str) -> bool:
    constructor = registered_constructor(name)
    if any(p.default is p.empty for p in inspect.signature(constructor).parameters.values()):
        return False
    try:
        constructor()
    except HyperdiffError:
        return False
    return True


def window_method(name: str, problem: Problem, *, engine: str = "double_vjp",
                  solver: Solver | str = "cg", backprop: int | None = None,
                  horizon: float | None = DEFAULT_HORIZON, horizon_unit: str = "steps",
                  curvature_scale: float | str | None = None) -> Method:
    """The method called ``name`` configured with the online tuner's options; options of other
    methods must keep their defaults (raises :class:`~hyperdiff.errors.HyperdiffError` naming
    the bad one)."""
    names = online_methods()
    if name not in names:
        raise fail("OnlineTuner", "method", f"one of {names}", name)
    if engine not in ENGINES or engine == "auto":
        raise fail("OnlineTuner", "engine", "'double_vjp' or 'jvp'", engine)
    checked = _solver(solver)
    if backprop is not None:
        backprop = positive_int("OnlineTuner", "backprop", backprop)
        if name != "reverse":
            raise fail("OnlineTuner", "backprop", "None unless method='reverse'", backprop)
    curvature_defaults = (horizon, horizon_unit, curvature_scale) == (DEFAULT_HORIZON, "steps",
                                                                     None)
    if name != "forward" and engine != "double_vjp":
        raise fail("OnlineTuner", "engine", "its default 'double_vjp' unless method='forward'",
                   engine)
    if name != "implicit" and not (isinstance(solver, str) and solver == "cg"):
        raise fail("OnlineTuner", "solver", "its default 'cg' unless method='implicit'", solver)
    if name != "curvature" and not curvature_defaults:
        raise fail("OnlineTuner", "horizon / horizon_unit / curvature_scale",
                   "their defaults unless method='curvature'",
                   (horizon, horizon_unit, curvature_scale))
    by_name: dict[str, dict[str, Any]] = {
        "reverse": {} if backprop is None else {"k": backprop},
        "forward": {"engine": engine},
        "implicit": {"solver": checked},
        "curvature": dict(zip(("horizon", "horizon_unit", "curvature_scale"), curvature_options(
            "OnlineTuner", horizon, horizon_unit, curvature_scale), strict=True)),
    }
    constructor = registered_constructor("truncated" if backprop is not None else name)
    method = constructor(**by_name.get(name, {}))
    method.check(problem)
    return method


def window_name(method: Method) -> str:
    """The online tuner's name of a configured ``method`` (in checkpoints and reports):
    ``truncated(k)`` is ``"reverse"`` with ``backprop=k``."""
    return "reverse" if method.name == "truncated" else method.name


def _solver(solver: Solver | str) -> Solver:
    """The online solvers: ``"cg"`` is ``cg(maxiter=50)``, ``"neumann"`` 20 iterations."""
    if isinstance(solver, Solver):
        return solver
    if solver == "cg":
        return cg(maxiter=50)
    if solver == "neumann":
        return neumann(iterations=20)
    raise fail("OnlineTuner", "solver",
               "a hd.solvers.cg() / hd.solvers.neumann() Solver, 'cg' or 'neumann'", solver)


__all__ = ["online_methods", "window_method", "window_name"]
