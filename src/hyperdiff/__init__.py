"""hyperdiff: gradient-based hyperparameter optimization for PyTorch.

The public names (``__all__``, 45), by what a tuning job needs:

- hyperparameters: ``HyperParameters``, ``scalar``, ``per_element``, ``per_feature``,
  ``per_tensor``, ``per_step``, ``initialization``, ``schedule``, ``categorical``,
  ``integer``, ``boolean``, ``choose``;
- model and data: ``functional``, ``FunctionalModel``, ``with_context``, ``minibatches``;
- inner optimizers: ``sgd``, ``adam``, ``adamw``;
- one hypergradient: ``hypergradient``, ``HyperGradient``;
- methods: ``reverse``, ``truncated``, ``checkpointed``, ``forward``, ``implicit``,
  ``finite_difference``, ``reversible``;
- outer loop: ``make_problem``, ``Problem``, ``HyperOptimizer``, ``Stopping``, ``CSVLogger``,
  ``TensorBoardLogger``;
- tasks: ``task``, ``given_splits``, ``Task``;
- export: ``torch_optimizer``, ``tuned_hparams``, ``load_into``;
- check: ``check``;
- errors: ``HyperdiffError``, ``NonFiniteError``, ``ConvergenceWarning``, ``CostWarning``.

The rest lives in namespaces, attributes of ``hd``: ``hd.solvers`` (``cg``, ``neumann``,
``exact``, ``Solver``, ``SolveResult``), ``hd.schedules`` (``resample``, ``resampled``,
``Schedule``), ``hd.discrete`` (``mix``, ``Choice``, ...), ``hd.tasks`` (``build_task``,
``TaskSpec``, ``TaskData``, ``SearchRange``, ``SearchChoices``, ...), ``hd.diagnose``
(``recommend``, ``Advice``, ``CheckReport``), ``hd.testing`` (ridge and logistic problems
with closed-form answers, ``train``), ``hd.plans`` (``OfflinePlan``, ``OnlinePlan``, the plans
of ``HyperOptimizer``), ``hd.online`` (the deprecated ``OnlineTuner``, ``OnlineResult``),
``hd.distributed``, ``hd.constraints`` (``Positive``, ``Interval``, ``Free``, ``Constraint``),
``hd.history`` (``OptimizeResult``, ``History``, ``StepRecord``), ``hd.hyperparams``
(``HyperParameter``, ``HParamView``), ``hd.models`` (``StepContext``), ``hd.methods`` (``Method``),
``hd.optimizers`` (``Optimizer``), ``hd.data`` (``BatchSource``) and ``hd.export``
(``TunedSchedule``).

The names that used to be top-level (``hd.cg``, ``hd.OnlineTuner``, ``hd.linear``, ...) still
resolve, with a ``DeprecationWarning`` naming the new spelling, for one release.
"""

import importlib
import warnings
from types import ModuleType
from typing import Any

from hyperdiff import diagnose, methods, testing
from hyperdiff.app import export, tasks
from hyperdiff.app.export import load_into, torch_optimizer, tuned_hparams
from hyperdiff.app.loggers import CSVLogger, TensorBoardLogger
from hyperdiff.app.tasks import Task, given_splits, task
from hyperdiff.diagnose.check import check
from hyperdiff.engine import data, models, optimizers, solvers
from hyperdiff.engine.data import minibatches
from hyperdiff.engine.make import make_problem
from hyperdiff.engine.models import FunctionalModel, functional
from hyperdiff.engine.optimizers import adam, adamw, sgd
from hyperdiff.engine.problem import Problem, with_context
from hyperdiff.engine.solvers import ConvergenceWarning
from hyperdiff.errors import HyperdiffError, NonFiniteError
from hyperdiff.hparams import constraints, discrete, hyperparams, schedules
from hyperdiff.hparams.discrete import boolean, categorical, integer
from hyperdiff.hparams.hyperparams import (
    HyperParameters,
    per_element,
    per_feature,
    per_step,
    per_tensor,
    scalar,
)
from hyperdiff.hparams.initialization import initialization
from hyperdiff.hparams.relax import choose
from hyperdiff.hparams.schedules import schedule
from hyperdiff.methods import (
    CostWarning,
    HyperGradient,
    checkpointed,
    finite_difference,
    forward,
    implicit,
    reverse,
    reversible,
    truncated,
)
from hyperdiff.methods.api import hypergradient
from hyperdiff.tuner import distributed, history, online, plans
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.version import __version__ as __version__

__all__ = [
    "CSVLogger",
    "ConvergenceWarning",
    "CostWarning",
    "FunctionalModel",
    "HyperGradient",
    "HyperOptimizer",
    "HyperParameters",
    "HyperdiffError",
    "NonFiniteError",
    "Problem",
    "Stopping",
    "Task",
    "TensorBoardLogger",
    "adam",
    "adamw",
    "boolean",
    "categorical",
    "check",
    "checkpointed",
    "choose",
    "finite_difference",
    "forward",
    "functional",
    "given_splits",
    "hypergradient",
    "implicit",
    "initialization",
    "integer",
    "load_into",
    "make_problem",
    "minibatches",
    "per_element",
    "per_feature",
    "per_step",
    "per_tensor",
    "reverse",
    "reversible",
    "scalar",
    "schedule",
    "sgd",
    "task",
    "torch_optimizer",
    "truncated",
    "tuned_hparams",
    "with_context",
]

# hd.<namespace>: the modules that hold the names outside __all__ (keyed by the namespace's
# name, not the module's, so that a module may move without changing its namespace)
_NAMESPACES: dict[str, ModuleType] = {
    "constraints": constraints,
    "data": data,
    "diagnose": diagnose,
    "discrete": discrete,
    "distributed": distributed,
    "export": export,
    "history": history,
    "hyperparams": hyperparams,
    "methods": methods,
    "models": models,
    "online": online,
    "optimizers": optimizers,
    "plans": plans,
    "schedules": schedules,
    "solvers": solvers,
    "tasks": tasks,
    "testing": testing,
}

# old top-level name -> the namespace that holds it now (deprecated for one release)
_MOVED: dict[str, str] = {
    "Advice": "diagnose",
    "BatchSource": "data",
    "CheckReport": "diagnose",
    "Choice": "discrete",
    "Constraint": "constraints",
    "Free": "constraints",
    "HParamView": "hyperparams",
    "History": "history",
    "HyperParameter": "hyperparams",
    "Interval": "constraints",
    "Method": "methods",
    "OnlineResult": "online",
    "OnlineTuner": "online",
    "OptimizeResult": "history",
    "Optimizer": "optimizers",
    "Positive": "constraints",
    "Schedule": "schedules",
    "SearchRange": "tasks",
    "SolveResult": "solvers",
    "Solver": "solvers",
    "StepContext": "models",
    "StepRecord": "history",
    "TaskData": "tasks",
    "TaskSpec": "tasks",
    "TunedSchedule": "export",
    "build_task": "tasks",
    "cg": "solvers",
    "exact": "solvers",
    "mix": "discrete",
    "neumann": "solvers",
    "recommend": "diagnose",
    "resample": "schedules",
    "resampled": "schedules",
    "train": "testing",
}
# old top-level module -> the namespace that replaces it
_MOVED_MODULES: dict[str, str] = {"linear": "testing"}

# importing hd.testing bound the module ``linear`` here; it is reached through __getattr__
globals().pop("linear", None)


def __getattr__(name: str) -> Any:
    """Old top-level names: the object, with a DeprecationWarning naming the new spelling."""
    if name in _MOVED:
        new = f"hd.{_MOVED[name]}.{name}"
        value = getattr(_NAMESPACES[_MOVED[name]], name)
    elif name in _MOVED_MODULES:
        new = f"hd.{_MOVED_MODULES[name]}"
        value = importlib.import_module(f"{__name__}.{_MOVED_MODULES[name]}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"hd.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
    return value


def __dir__() -> list[str]:
    """The public names and the namespaces, not the internal modules."""
    return sorted([*__all__, *_NAMESPACES, "__version__"])
