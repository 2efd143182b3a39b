"""One error type and one message format for bad input.

Messages read ``"<caller>: <what> must be <valid> (got <value>)"`` so that a user sees who
complained, about which argument, what would be valid and what they passed.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class HyperdiffError(ValueError):
    """Raised for invalid input to hyperdiff (a ``ValueError``)."""


class NonFiniteError(FloatingPointError):
    """Raised when a loss or hypergradient is NaN or infinite."""


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
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    if not math.isfinite(value) or value <= 0:
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
