"""Reptile: the distance training moved from theta_0, as theta_0's hypergradient.

Reptile (Nichol et al. 2018) moves theta_0 towards the parameters each task adapts to:
``theta_0 <- theta_0 + eps (theta_T - theta_0)``. As a hypergradient method (for a problem
whose initialization is a hyperparameter, ``hd.initialization``)::

    g_theta0 = scale * (theta_0 - theta_T)
    g_other  = dL_val/du |direct     (no path through training, as first-order MAML's)

**The convention.** With ``scale=1`` (the default) an outer SGD step of rate ``eps`` is
Reptile's update exactly. For inner SGD with rate ``alpha``, ``scale = 1 / (T alpha)`` makes
``g`` the mean of the T training gradients along the path, comparable in size to the
(first-order) MAML meta-gradient; Adam, the outer default, is invariant to the scale. Reptile
uses the support (training) set only; the validation loss is reported but not differentiated
for theta_0. Time about plain training, memory O(params); the tasks of a meta step with equal
shapes train as one vmapped computation, as first-order MAML's.
"""

from __future__ import annotations

from hyperdiff.errors import positive_float
from hyperdiff.methods.base import Capabilities, Method
from hyperdiff.methods.fomaml import (
    check_first_order,
    first_order,
    first_order_batch,
    partial_first_order,
)
from hyperdiff.typing import Params

CAPABILITIES = Capabilities(exact=False, offline=True)


def reptile(scale: float = 1.0) -> Method:
    """Reptile: ``scale * (theta_0 - theta_T)`` as theta_0's hypergradient (module doc).

    Raises:
        HyperdiffError: ``scale`` is not a positive number.
    """
    factor = positive_float("reptile", "scale", scale)

    def moved(theta0: Params, theta_t: Params, g_t: Params) -> Params:
        return {k: factor * (theta0[k] - theta_t[k]) for k in theta0}

    return Method("reptile", partial_first_order(first_order, "reptile", moved),
                  options={"scale": factor}, capabilities=CAPABILITIES,
                  check_fn=check_first_order("reptile"),
                  batch_fn=partial_first_order(first_order_batch, "reptile", moved))


__all__ = ["CAPABILITIES", "reptile"]
