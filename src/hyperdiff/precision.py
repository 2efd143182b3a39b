"""A float64 copy of a problem, for references that float32 cannot give.

Central finite differences in float32 are dominated by rounding: with the step
``h = eps^(1/3) ~ 5e-3`` the difference quotient carries an error of about
``eps32 |L| / h ~ 2.4e-5 |L|`` per coordinate, which is 40% or more of a small hypergradient.
:func:`in_float64` casts the parameters, buffers and every floating-point tensor of the data
(batch by batch, as training asks for them) to float64, so that the same training can be
differentiated by finite differences at float64 precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from .data import BatchSource
from .problem import Problem
from .typing import Batch


def cast(batch: Batch, dtype: torch.dtype) -> Batch:
    """``batch`` with every floating-point tensor cast to ``dtype`` (others unchanged)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: cast(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(cast(v, dtype) for v in batch)
    if isinstance(batch, list):
        return [cast(v, dtype) for v in batch]
    return batch


class CastSource(BatchSource):
    """The batches of ``source``, cast to ``dtype``."""

    def __init__(self, source: BatchSource, dtype: torch.dtype):
        self.source, self.dtype = source, dtype

    def batch(self, step: int, seed: int) -> Batch:
        return cast(self.source.batch(step, seed), self.dtype)

    def check(self, steps: int, seed: int) -> None:
        self.source.check(steps, seed)


def in_float64(problem: Problem) -> Problem:
    """The same problem with parameters, buffers and data in float64."""
    dtype = torch.float64

    def params(values: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in values.items()}

    return replace(
        problem, params=params(problem.params), buffers=params(problem.buffers),
        train_data=CastSource(problem.train_data, dtype),
        val_data=[cast(b, dtype) for b in problem.val_data],
    )
