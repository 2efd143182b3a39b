"""hyperdiff: gradient-based hyperparameter optimization for PyTorch."""

from .api import hypergradient
from .constraints import Constraint, Free, Interval, Positive
from .data import BatchSource, minibatches
from .errors import HyperdiffError, NonFiniteError
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
from .methods import CostWarning, HyperGradient, Method, finite_difference, forward, reverse
from .models import FunctionalModel, StepContext, functional
from .optimizers import Optimizer, adam, adamw, sgd
from .problem import Problem, make_problem
from .training import train

__version__ = "0.1.0"

__all__ = [
    "BatchSource",
    "Constraint",
    "CostWarning",
    "Free",
    "FunctionalModel",
    "HParamView",
    "HyperGradient",
    "HyperParameter",
    "HyperParameters",
    "HyperdiffError",
    "Interval",
    "Method",
    "NonFiniteError",
    "Optimizer",
    "Positive",
    "Problem",
    "StepContext",
    "adam",
    "adamw",
    "finite_difference",
    "forward",
    "functional",
    "hypergradient",
    "make_problem",
    "minibatches",
    "per_element",
    "per_feature",
    "per_step",
    "per_tensor",
    "reverse",
    "scalar",
    "sgd",
    "train",
]
