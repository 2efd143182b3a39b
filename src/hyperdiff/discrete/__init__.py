"""Discrete hyperparameters (categorical, integer, boolean) in the same outer loop as the
continuous ones, differentiated by relaxation, straight-through Gumbel-softmax or REINFORCE.

- :mod:`~hyperdiff.discrete.kinds`: ``categorical``, ``integer``, ``boolean`` (raw logits,
  natural probabilities) and their modes;
- :mod:`~hyperdiff.discrete.relax`: what a loss reads (:class:`Choice`) and ``choose`` / ``mix``;
- :mod:`~hyperdiff.discrete.gumbel`: straight-through Gumbel-softmax weights;
- :mod:`~hyperdiff.discrete.reinforce`: the score-function estimator and its baselines;
- :mod:`~hyperdiff.discrete.outer`: the outer loop's hook (samples, temperatures, estimates);
- :mod:`~hyperdiff.discrete.report`: discretise and report the relaxation gap.

See docs/discrete.md.
"""

from .kinds import (
    DiscreteParameter,
    Softmax,
    best_choices,
    boolean,
    categorical,
    discrete_names,
    integer,
    with_states,
)
from .relax import Choice, choose, mix

__all__ = ["Choice", "DiscreteParameter", "Softmax", "best_choices", "boolean", "categorical",
           "choose", "discrete_names", "integer", "mix", "with_states"]
