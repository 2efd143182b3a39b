"""A float64 copy of a problem, for references that float32 cannot give.

Central finite differences in float32 are dominated by rounding: with the step
``h = eps^(1/3) ~ 5e-3`` the difference quotient carries an error of about
``eps32 |L| / h ~ 2.4e-5 |L|`` per coordinate, which is 40% or more of a small hypergradient.
:func:`in_float64` casts the parameters, buffers and every floating-point tensor of the data
(batch by batch, as training asks for them) to float64, so that the same training can be
differentiated by finite differences at float64 precision. A loss that casts to lower precision
(``.float()``, a float32 constant it multiplies in place of the inputs' dtype) would make the
copy compute in float32 in disguise: the copy's losses refuse to return anything but float64
(:class:`LowerPrecisionError`, at the first evaluation).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import torch

from hyperdiff.engine.device import OnDevice, move
from hyperdiff.engine.problem import Problem
from hyperdiff.errors import HyperdiffError
from hyperdiff.typing import LossFn


class LowerPrecisionError(HyperdiffError):
    """A float64 copy's loss returned a lower-precision value: the copy is not float64."""


def _in_float64_only(loss: LossFn, which: str) -> LossFn:
    """``loss`` (same signature and marks), refusing to return a floating-point tensor of
    another dtype than float64."""

    @functools.wraps(loss)
    def checked(*args: Any) -> Any:
        value = loss(*args)
        if isinstance(value, torch.Tensor) and value.is_floating_point() \
                and value.dtype != torch.float64:
            dtype = str(value.dtype).removeprefix("torch.")
            raise LowerPrecisionError(
                f"its float64 copy computes in {dtype}: {which} returns a {dtype} loss from "
                f"float64 parameters and data (it casts to lower precision, e.g. .float(), or "
                "computes with lower-precision constants)")
        return value

    return checked


def in_float64(problem: Problem) -> Problem:
    """The same problem with parameters, buffers and data in float64, on its device.

    The training batches are those of ``problem.train_data`` (after any cast of an earlier
    ``Problem.to``), cast as they are read by an :class:`~hyperdiff.engine.device.OnDevice` wrapper.
    Its losses raise :class:`LowerPrecisionError` where they return another floating dtype.
    """
    device, dtype = problem.device, torch.float64
    return replace(
        problem, train_loss=_in_float64_only(problem.train_loss, "train_loss"),
        val_loss=_in_float64_only(problem.val_loss, "val_loss"),
        params=move(problem.params, device, dtype),
        buffers=move(problem.buffers, device, dtype),
        train_data=OnDevice(problem.train_data, device, dtype),
        val_data=[move(b, device, dtype) for b in problem.val_data],
    )
