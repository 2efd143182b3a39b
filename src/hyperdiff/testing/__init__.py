"""``hd.testing``: reference problems with exact answers, to test a method or a change against.

- :func:`ridge` / :func:`logistic` (:class:`LinearProblem`, :func:`load_dataset`): ridge and
  L2-regularised logistic regression as ready-made bilevel problems (see
  :mod:`hyperdiff.testing.linear`);
- :func:`ridge_solution` / :func:`ridge_hypergradient`: their closed-form optimum and
  hypergradient (:mod:`hyperdiff.testing.closed_form`);
- :func:`train`: the plain inner training of a problem, ``(final state, validation loss)``.
"""

from hyperdiff.engine.training import train
from hyperdiff.testing.closed_form import RidgeAnswer, ridge_hypergradient, ridge_solution
from hyperdiff.testing.linear import (
    DATASETS,
    REGULARIZATIONS,
    Dataset,
    LinearProblem,
    load_dataset,
    logistic,
    ridge,
)

__all__ = ["DATASETS", "REGULARIZATIONS", "Dataset", "LinearProblem", "RidgeAnswer",
           "load_dataset", "logistic", "ridge", "ridge_hypergradient", "ridge_solution", "train"]
