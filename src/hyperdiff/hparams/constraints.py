"""Constraints as invertible elementwise maps between raw and natural values.

Hypergradient descent moves the *raw* (unconstrained) value ``u``; users read and write the
*natural* value ``x = f(u)``. Every map here is elementwise, smooth and strictly increasing, so
``dL/du = dL/dx * f'(u)`` and the natural-unit gradient is ``dL/dx = (dL/du) / f'(u)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError, describe, fail, is_number


class Constraint:
    """Base class: ``to_natural(u) = x``, ``to_raw(x) = u``, ``derivative(u) = dx/du``."""

    name = "constraint"

    def to_natural(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def to_raw(self, natural: Tensor) -> Tensor:
        raise NotImplementedError

    def derivative(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def valid(self, natural: Tensor) -> Tensor:
        """Boolean mask of natural values inside the constraint (finite ones only)."""
        raise NotImplementedError

    def describe_valid(self) -> str:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What defines the map besides :attr:`name`, JSON-ready: an interval's ``low`` and
        ``high``, a positive constraint's ``transform`` (the numbers and strings among a
        dataclass's fields; ``{}`` for others). A run records them (``hparams.json``), so that
        ``--from`` can refuse raw values that another map would read as other natural values.

        >>> Interval(0.0, 10.0).settings()
        {'low': 0.0, 'high': 10.0}
        """
        if not is_dataclass(self):
            return {}
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v if isinstance(v, str) else float(v) for k, v in values.items()
                if isinstance(v, str) or (is_number(v) and math.isfinite(float(v)))}


@dataclass(frozen=True)
class Free(Constraint):
    """No constraint: ``x = u``."""

    name = "free"

    def to_natural(self, raw: Tensor) -> Tensor:
        return raw

    def to_raw(self, natural: Tensor) -> Tensor:
        return natural

    def derivative(self, raw: Tensor) -> Tensor:
        return torch.ones_like(raw)

    def valid(self, natural: Tensor) -> Tensor:
        return torch.isfinite(natural)

    def describe_valid(self) -> str:
        return "finite"


@dataclass(frozen=True)
class Positive(Constraint):
    """``x > 0`` through ``x = exp(u)`` (``transform="log"``) or ``x = softplus(u)``."""

    transform: str = "log"
    name = "positive"

    def __post_init__(self) -> None:
        if self.transform not in ("log", "softplus"):
            raise HyperdiffError(
                f"Positive: transform must be 'log' or 'softplus' (got {describe(self.transform)})"
            )

    def to_natural(self, raw: Tensor) -> Tensor:
        if self.transform == "log":
            return torch.exp(raw)
        return torch.nn.functional.softplus(raw)

    def to_raw(self, natural: Tensor) -> Tensor:
        if self.transform == "log":
            return torch.log(natural)
        # softplus^-1(x) = x + log(-expm1(-x)), stable for small and large x
        return natural + torch.log(-torch.expm1(-natural))

    def derivative(self, raw: Tensor) -> Tensor:
        if self.transform == "log":
            return torch.exp(raw)
        return torch.sigmoid(raw)

    def valid(self, natural: Tensor) -> Tensor:
        return torch.isfinite(natural) & (natural > 0)

    def describe_valid(self) -> str:
        return "finite and > 0"


@dataclass(frozen=True)
class Interval(Constraint):
    """``low < x < high`` through ``x = low + (high - low) * sigmoid(u)``."""

    low: float = 0.0
    high: float = 1.0
    name = "interval"

    def __post_init__(self) -> None:
        for what, bound in (("low", self.low), ("high", self.high)):
            if not is_number(bound):  # a tensor or a string would print as a number
                raise fail("Interval", what, "a real number", bound)
        if not (math.isfinite(self.low)
                and math.isfinite(self.high) and self.low < self.high):
            raise HyperdiffError(
                "Interval: bounds must be finite with low < high "
                f"(got low={self.low}, high={self.high})"
            )

    def to_natural(self, raw: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(raw)

    def to_raw(self, natural: Tensor) -> Tensor:
        unit = (natural - self.low) / (self.high - self.low)
        return torch.log(unit) - torch.log1p(-unit)

    def derivative(self, raw: Tensor) -> Tensor:
        s = torch.sigmoid(raw)
        return (self.high - self.low) * s * (1 - s)

    def valid(self, natural: Tensor) -> Tensor:
        return torch.isfinite(natural) & (natural > self.low) & (natural < self.high)

    def describe_valid(self) -> str:
        return f"strictly between {self.low} and {self.high}"


def as_constraint(
    spec: Constraint | str | tuple[float, float] | None, caller: str = "hyperparameter"
) -> Constraint:
    """Accept a Constraint, a name ('free', 'positive', 'log', 'softplus') or (low, high)."""
    if spec is None:
        return Positive()
    if isinstance(spec, Constraint):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        low, high = spec
        if not (is_number(low) and is_number(high) and math.isfinite(low)
                and math.isfinite(high) and low < high):
            raise HyperdiffError(
                f"{caller}: constraint bounds (low, high) must be finite numbers with "
                f"low < high (got {describe(spec)})"
            )
        return Interval(float(low), float(high))
    names = {"free": Free(), "positive": Positive(), "log": Positive("log"),
             "softplus": Positive("softplus")}
    if isinstance(spec, str) and spec in names:
        return names[spec]
    raise HyperdiffError(
        f"{caller}: constraint must be a Constraint, one of 'free', 'positive', 'log', "
        f"'softplus', or a (low, high) tuple (got {describe(spec)})"
    )


def natural_range(constraint: Constraint) -> tuple[float | None, float | None]:
    """``(low, high)`` of the natural values a constraint allows (``None``: unbounded); every
    built-in constraint excludes its ends."""
    if isinstance(constraint, Positive):
        return 0.0, None
    if isinstance(constraint, Interval):
        return constraint.low, constraint.high
    return None, None


__all__ = ["Constraint", "Free", "Interval", "Positive", "as_constraint", "natural_range"]
