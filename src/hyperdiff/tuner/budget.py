"""Whether a finished run's hyperparameters were still moving when its budget ran out.

Over the last ``k = max(2, ceil(fraction * n))`` of ``n`` outer steps the relative change of a
scalar's natural value is ``|lam_last - lam_first| / |lam_first|`` (``lam_first`` the value
``k`` steps before the last one); a vector's is the largest of its entries' relative changes.
Only ``"ok"`` steps count (a failed step's values were restored by the guard).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hyperdiff.tuner.history import StepRecord

FRACTION = 0.2  # the last 20% of the outer steps
THRESHOLD = 0.1  # a relative change above 10% in them counts as still moving


def relative_change(first: Any, last: Any) -> float:
    """``max_i |last_i - first_i| / |first_i|`` over the entries of two scalars or lists
    (``inf`` where ``first_i`` is 0 and ``last_i`` is not; ``nan`` entries are skipped)."""
    pairs = zip(first, last, strict=True) if isinstance(first, list) else [(first, last)]
    changes = [0.0]
    for a, b in pairs:
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        if a == b:
            continue
        changes.append(abs(b - a) / abs(a) if a != 0 else math.inf)
    return max(changes)


def recent_changes(history: Sequence[StepRecord], *,
                   fraction: float = FRACTION) -> tuple[int, dict[str, float]]:
    """The window ``k`` and each hyperparameter's relative change over the last ``k`` steps.

    Returns ``(0, {})`` when fewer than ``k + 1`` good steps exist (nothing to compare).
    Entries not of a float or list of floats (discrete choices) are left out.
    """
    good = [record for record in history if record.status == "ok"]
    window = max(2, math.ceil(fraction * len(good)))
    if len(good) <= window:
        return 0, {}
    first, last = good[-1 - window].hparams, good[-1].hparams
    changes = {}
    for name, value in last.items():
        old = first.get(name)
        numeric = isinstance(value, float) or (
            isinstance(value, list) and all(isinstance(x, float) or x is None for x in value))
        same_shape = (isinstance(value, float) and isinstance(old, float)) or (
            isinstance(value, list) and isinstance(old, list) and len(value) == len(old))
        if numeric and same_shape:
            changes[name] = relative_change(old, value)
    return window, changes


def still_moving(history: Sequence[StepRecord], *, threshold: float = THRESHOLD,
                 fraction: float = FRACTION, label: str = "outer steps") -> str | None:
    """A warning naming the hyperparameters whose relative change over the last
    ``fraction`` of the steps exceeds ``threshold``, or ``None`` when none does; ``label``
    names the steps of ``history`` (``"gradient-phase steps"`` when a global phase's points
    were left out: ``over the last 2 of the 3 gradient-phase steps``).

    >>> from dataclasses import replace
    >>> base = StepRecord(0, {"lr": 1.0}, "ok", 1.0, 1.0, 0.0, None, 1.0, None, None, 0.1,
    ...                   True, 1, "", 0.0, 0.0)
    >>> still_moving([replace(base, step=s, hparams={"lr": 1.0 + s}) for s in range(5)])
    'still moving: lr changed by 67% over the last 2 of 5 outer steps (threshold 10%)'
    """
    window, changes = recent_changes(history, fraction=fraction)
    moving = {name: change for name, change in changes.items() if change > threshold}
    if not moving:
        return None
    names = ", ".join(f"{name} changed by {change:.0%}" for name, change in moving.items())
    steps = sum(record.status == "ok" for record in history)
    of = f"{steps} {label}" if label == "outer steps" else f"the {steps} {label}"
    return (f"still moving: {names} over the last {window} of {of} "
            f"(threshold {threshold:.0%})")

__all__ = ["FRACTION", "THRESHOLD", "recent_changes", "relative_change", "still_moving"]
