"""One error type and one message format for bad input.

Messages read ``"<caller>: <what> must be <valid> (got <value>)"`` so that a user sees who
complained, about which argument, what would be valid and what they passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, SupportsFloat

import torch


class HyperdiffError(ValueError):
    """Raised for invalid input to hyperdiff (a ``ValueError``)."""


class NonFiniteError(FloatingPointError):
    """Raised when a loss or hypergradient is NaN or infinite."""


class LossError(HyperdiffError, RuntimeError):
    """A user's loss function raised: the error says which loss, at which step, on which batch
    shapes. Also a ``RuntimeError``, so that code which falls back on torch's refusals (vmap's,
    a derivative forward mode lacks) still sees one."""


@contextmanager
def user_failure(message: Callable[[BaseException], str]) -> Iterator[None]:
    """Run the user's code: its exception or ``sys.exit`` (not hyperdiff's own errors)
    becomes one :class:`HyperdiffError` reading ``message(err)``, chained to it."""
    try:
        yield
    except HyperdiffError:
        raise
    except (Exception, SystemExit) as err:
        raise HyperdiffError(message(err)) from err


class Text(str):
    """A description to show as is (not quoted) in an error message."""


def describe(value: Any) -> str:
    """Short printable form of a user value for error messages."""
    if isinstance(value, Text):
        return str(value)
    if isinstance(value, torch.Tensor):
        if value.numel() <= 6:
            return f"tensor({value.detach().cpu().tolist()})"
        return f"tensor of shape {tuple(value.shape)} ({str(value.dtype).removeprefix('torch.')})"
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor)
                                                 for v in value.values()):
        return "a dict of tensors {" + ", ".join(
            f"{k!r}: {describe(v)}" for k, v in list(value.items())[:6]) + "}"
    if isinstance(value, (tuple, list)) and value and len(value) <= 6 and all(
            isinstance(v, torch.Tensor) for v in value):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return f"a {kind} of tensors (" + ", ".join(describe(v) for v in value) + ")"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**80:
        return _huge_int(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _huge_int(value: int) -> str:
    """An int of 81 digits or more by its leading digits and power of ten (its repr is too long
    to read, and past 4300 digits Python refuses to write it): ``1.000e+400, an int of 401
    digits``."""
    size = abs(value)
    power = int(math.log10(size))  # log10 takes any int; correct its rounding at a power of 10
    power += (10 ** (power + 1) <= size) - (10**power > size)
    lead = size // 10 ** (power - 3)
    sign = "-" if value < 0 else ""
    return f"{sign}{lead // 1000}.{lead % 1000:03d}e+{power}, an int of {power + 1} digits"


def as_float(value: Any) -> float:
    """``float(value)``, and +-inf for an int too large for a float (``float(10**400)`` raises
    ``OverflowError``), so that range checks refuse it as not finite."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def fail(caller: str, what: str, valid: str, got: Any) -> HyperdiffError:
    """Build the standard error; ``raise fail(...)``."""
    return HyperdiffError(f"{caller}: {what} must be {valid} (got {describe(got)})")


def positive_int(caller: str, name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1, else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(caller, name, "a positive int", value)
    return value


def nonnegative_int(caller: str, name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise fail(caller, name, "a non-negative int", value)
    return value


def positive_float(caller: str, name: str, value: Any) -> float:
    """Return ``value`` as float if it is finite and > 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(caller, name, "a positive finite number", value)
    if not math.isfinite(as_float(value)) or value <= 0:
        raise fail(caller, name, "a positive finite number", value)
    return float(value)


def scalar_loss(caller: str, which: str, loss: Any) -> torch.Tensor:
    """Check that a loss function returned a finite scalar tensor."""
    if not isinstance(loss, torch.Tensor):
        raise fail(
            caller, f"{which} return value", "a scalar torch.Tensor", Text(type(loss).__name__)
        )
    if loss.dim() != 0:
        raise fail(
            caller,
            f"{which} return value",
            "a scalar tensor (reduce it with .mean() or .sum())",
            Text(f"shape {tuple(loss.shape)}"),
        )
    if not loss.is_floating_point():
        raise fail(caller, f"{which} return value", "a floating-point tensor", loss.dtype)
    return loss


def is_number(value: Any) -> bool:
    """True for a real Python or NumPy number (``bool`` excluded)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and (
        getattr(value, "ndim", 1) == 0 and value.dtype.kind in "iuf"
    )


@dataclass(frozen=True)
class Range:
    """A set of valid numbers ``low <= x <= high`` (each end open or closed, or absent).

    >>> Range(0.0, 1.0, open_high=True).text()
    'a finite number in [0, 1)'
    """

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def contains(self, value: SupportsFloat) -> bool:
        value = as_float(value)  # an int too large for a float is not finite
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or not (
            value >= self.high if self.open_high else value > self.high
        )

    def tensor_contains(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise :meth:`contains` (a boolean tensor)."""
        ok = torch.isfinite(value)
        if self.low is not None:
            ok &= value > self.low if self.open_low else value >= self.low
        if self.high is not None:
            ok &= value < self.high if self.open_high else value <= self.high
        return ok

    def text(self, noun: str = "a finite number") -> str:
        low, high = self.low, self.high
        if low is not None and high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"{noun} in {left}{low:g}, {high:g}{right}"
        if low is not None:
            return f"{noun} {'>' if self.open_low else '>='} {low:g}"
        if high is not None:
            return f"{noun} {'<' if self.open_high else '<='} {high:g}"
        return noun


ANY = Range()
NONNEGATIVE = Range(0.0)
POSITIVE = Range(0.0, open_low=True)
UNIT = Range(0.0, 1.0)
UNIT_OPEN_HIGH = Range(0.0, 1.0, open_high=True)


def number(caller: str, name: str, value: Any, valid: Range = ANY) -> float:
    """Return ``value`` as a float if it is a finite real number in ``valid``, else raise
    ``"<caller>: <name> must be <valid> (got <value>)"``."""
    if not is_number(value) or not valid.contains(as_float(value)):
        raise fail(caller, name, valid.text(), value)
    return float(value)
