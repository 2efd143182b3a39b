"""hyperdiff: gradient-based hyperparameter optimization for PyTorch."""

from hyperdiff.app import tasks as tasks  # hd.tasks stays reachable
from hyperdiff.app.export import TunedSchedule, load_into, torch_optimizer, tuned_hparams
from hyperdiff.app.loggers import CSVLogger, TensorBoardLogger
from hyperdiff.app.tasks import (
    SearchChoices,
    SearchRange,
    Task,
    TaskData,
    TaskSpec,
    build_task,
    given_splits,
    task,
)
from hyperdiff.diagnose.advice import Advice, recommend
from hyperdiff.diagnose.check import CheckReport, check
from hyperdiff.engine.data import BatchSource, minibatches
from hyperdiff.engine.make import make_problem
from hyperdiff.engine.models import FunctionalModel, StepContext, functional
from hyperdiff.engine.optimizers import Optimizer, adam, adamw, sgd
from hyperdiff.engine.problem import Problem, with_context
from hyperdiff.engine.solvers import ConvergenceWarning, Solver, SolveResult, cg, exact, neumann
from hyperdiff.engine.training import train
from hyperdiff.errors import HyperdiffError, NonFiniteError
from hyperdiff.hparams.constraints import Constraint, Free, Interval, Positive
from hyperdiff.hparams.discrete import boolean, categorical, integer
from hyperdiff.hparams.hyperparams import (
    HParamView,
    HyperParameter,
    HyperParameters,
    per_element,
    per_feature,
    per_step,
    per_tensor,
    scalar,
)
from hyperdiff.hparams.relax import Choice, choose, mix
from hyperdiff.hparams.schedules import Schedule, resample, resampled, schedule
from hyperdiff.methods import (
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
from hyperdiff.methods.api import hypergradient
from hyperdiff.testing import linear
from hyperdiff.tuner import distributed
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.history import History, OptimizeResult, StepRecord
from hyperdiff.tuner.online import OnlineResult, OnlineTuner
from hyperdiff.version import __version__ as __version__

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
    "SearchChoices",
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
