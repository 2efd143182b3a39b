"""A float64 copy of a problem, for references that float32 cannot give.

Central finite differences in float32 are dominated by rounding: with the step
``h = eps^(1/3) ~ 5e-3`` the difference quotient carries an error of about
``eps32 |L| / h ~ 2.4e-5 |L|`` per coordinate, which is 40% or more of a small hypergradient.
:func:`in_float64` casts the parameters, buffers and every floating-point tensor of the data
(batch by batch, as training asks for them) to float64, so that the same training can be
differentiated by finite differences at float64 precision.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from hyperdiff.engine.device import OnDevice, move
from hyperdiff.engine.problem import Problem


def in_float64(problem: Problem) -> Problem:
    """The same problem with parameters, buffers and data in float64, on its device.

    The training batches are those of ``problem.train_data`` (after any cast of an earlier
    ``Problem.to``), cast as they are read by an :class:`~hyperdiff.engine.device.OnDevice` wrapper.
    """
    device, dtype = problem.device, torch.float64
    return replace(
        problem, params=move(problem.params, device, dtype),
        buffers=move(problem.buffers, device, dtype),
        train_data=OnDevice(problem.train_data, device, dtype),
        val_data=[move(b, device, dtype) for b in problem.val_data],
    )
