"""hyperdiff: gradient-based hyperparameter optimization for PyTorch."""

from . import linear
from .advice import Advice, recommend
from .api import hypergradient
from .check import CheckReport, check
from .constraints import Constraint, Free, Interval, Positive
from .data import BatchSource, minibatches
from .discrete import Choice, boolean, categorical, choose, integer, mix
from .driver import HyperOptimizer, Stopping
from .errors import HyperdiffError, NonFiniteError
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
from .optimizers import Optimizer, adam, adamw, sgd
from .problem import Problem, make_problem
from .solvers import ConvergenceWarning, Solver, SolveResult, cg, exact, neumann
from .training import train

__version__ = "0.1.0"

__all__ = [
    "Advice",
    "BatchSource",
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
    "OptimizeResult",
    "Optimizer",
    "Positive",
    "Problem",
    "SolveResult",
    "Solver",
    "StepContext",
    "StepRecord",
    "Stopping",
    "adam",
    "adamw",
    "boolean",
    "categorical",
    "cg",
    "check",
    "checkpointed",
    "choose",
    "exact",
    "finite_difference",
    "forward",
    "functional",
    "hypergradient",
    "implicit",
    "integer",
    "linear",
    "make_problem",
    "minibatches",
    "mix",
    "neumann",
    "per_element",
    "per_feature",
    "per_step",
    "per_tensor",
    "recommend",
    "reverse",
    "reversible",
    "scalar",
    "sgd",
    "train",
    "truncated",
]
