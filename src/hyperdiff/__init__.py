"""hyperdiff: gradient-based hyperparameter optimization for PyTorch."""

from . import distributed, linear
from .advice import Advice, recommend
from .api import hypergradient
from .check import CheckReport, check
from .constraints import Constraint, Free, Interval, Positive
from .data import BatchSource, minibatches
from .discrete import Choice, boolean, categorical, choose, integer, mix
from .driver import HyperOptimizer, Stopping
from .errors import HyperdiffError, NonFiniteError
from .export import TunedSchedule, load_into, torch_optimizer, tuned_hparams
from .history import History, OptimizeResult, StepRecord
from .hyperparams import (
    HParamView,
    HyperParameter,
    HyperParameters,
    per_element,
    per_feature,
    per_step,
    per_tensor,
    scalar,
)
from .loggers import CSVLogger, TensorBoardLogger
from .methods import (
    CostWarning,
    HyperGradient,
    Method,
    checkpointed,
    finite_difference,
    forward,
    implicit,
    reverse,
    reversible,
    truncated,
)
from .models import FunctionalModel, StepContext, functional
from .online import OnlineResult, OnlineTuner
from .optimizers import Optimizer, adam, adamw, sgd
from .problem import Problem, make_problem, with_context
from .schedules import Schedule, resample, resampled, schedule
from .solvers import ConvergenceWarning, Solver, SolveResult, cg, exact, neumann
from .tasks import SearchRange, Task, TaskData, TaskSpec, build_task, given_splits, task
from .training import train

__version__ = "0.1.0"

__all__ = [
    "Advice",
    "BatchSource",
    "CSVLogger",
    "CheckReport",
    "Choice",
    "Constraint",
    "ConvergenceWarning",
    "CostWarning",
    "Free",
    "FunctionalModel",
    "HParamView",
    "History",
    "HyperGradient",
    "HyperOptimizer",
    "HyperParameter",
    "HyperParameters",
    "HyperdiffError",
    "Interval",
    "Method",
    "NonFiniteError",
    "OnlineResult",
    "OnlineTuner",
    "OptimizeResult",
    "Optimizer",
    "Positive",
    "Problem",
    "Schedule",
    "SearchRange",
    "SolveResult",
    "Solver",
    "StepContext",
    "StepRecord",
    "Stopping",
    "Task",
    "TaskData",
    "TaskSpec",
    "TensorBoardLogger",
    "TunedSchedule",
    "adam",
    "adamw",
    "boolean",
    "build_task",
    "categorical",
    "cg",
    "check",
    "checkpointed",
    "choose",
    "distributed",
    "exact",
    "finite_difference",
    "forward",
    "functional",
    "given_splits",
    "hypergradient",
    "implicit",
    "integer",
    "linear",
    "load_into",
    "make_problem",
    "minibatches",
    "mix",
    "neumann",
    "per_element",
    "per_feature",
    "per_step",
    "per_tensor",
    "recommend",
    "resample",
    "resampled",
    "reverse",
    "reversible",
    "scalar",
    "schedule",
    "sgd",
    "task",
    "torch_optimizer",
    "train",
    "truncated",
    "tuned_hparams",
    "with_context",
]
