"""Whether a finished run's hyperparameters were still moving when its budget ran out.

Over the last ``k = max(2, ceil(fraction * n))`` of ``n`` outer steps the relative change of a
scalar's natural value is ``|lam_last - lam_first| / |lam_first|`` (``lam_first`` the value
``k`` steps before the last one); a vector's is the largest of its entries' relative changes,
an entry that was 0 measured against the vector's largest ``|lam_first|`` (a bias in a MAML
initialisation starts at 0). A value that was 0 everywhere has no scale: any change of it is
infinite and the warning says how far it moved from 0.
Only ``"ok"`` steps count (a failed step's values were restored by the guard). Discrete
hyperparameters are left out: their records are the choices' probabilities, not values of
the hyperparameter (their names: the given ``discrete``, else those the records' ``discrete``
entries name).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

from hyperdiff.tuner.history import StepRecord

FRACTION = 0.2  # the last 20% of the outer steps
THRESHOLD = 0.1  # a relative change above 10% in them counts as still moving


def relative_change(first: Any, last: Any) -> float:
    """``max_i |last_i - first_i| / |first_i|`` over the entries of two scalars or lists, an
    entry whose ``first_i`` is 0 divided by ``max_j |first_j|`` instead (``inf`` where that is
    0 too and ``last_i`` is not; ``nan`` and ``None`` entries are skipped).

    >>> relative_change([0.5, 0.0], [0.5, 0.1])  # the zero entry against 0.5
    0.2
    """
    pairs = [(a, b) for a, b in (zip(first, last, strict=True) if isinstance(first, list)
                                 else [(first, last)])
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    scale = max((abs(a) for a, _ in pairs), default=0.0)
    changes = [0.0]
    for a, b in pairs:
        if a != b:
            base = abs(a) if a != 0 else scale
            changes.append(abs(b - a) / base if base != 0 else math.inf)
    return max(changes)


def absolute_change(first: Any, last: Any) -> float:
    """``max_i |last_i - first_i|`` over the entries of two scalars or lists (``nan`` and
    ``None`` entries skipped): how far a value that was 0 moved."""
    pairs = zip(first, last, strict=True) if isinstance(first, list) else [(first, last)]
    return max([abs(b - a) for a, b in pairs if a is not None and b is not None
                and math.isfinite(a) and math.isfinite(b)], default=0.0)


def recent_changes(history: Sequence[StepRecord], *, fraction: float = FRACTION,
                   discrete: Collection[str] | None = None) -> tuple[int, dict[str, float]]:
    """The window ``k`` and each hyperparameter's relative change over the last ``k`` steps.

    Returns ``(0, {})`` when fewer than ``k + 1`` good steps exist (nothing to compare).
    Discrete hyperparameters (``discrete``: their names, default those the records name,
    :func:`discrete_in`) and entries not of a float or list of floats are left out.
    """
    window, pairs = _window_values(history, fraction, discrete)
    return window, {name: relative_change(old, new) for name, (old, new) in pairs.items()}


def discrete_in(history: Sequence[StepRecord]) -> set[str]:
    """The discrete hyperparameters that the records' ``discrete`` entries name (relaxed ones
    by their temperature, REINFORCE ones by their drawn samples)."""
    names: set[str] = set()
    for record in history:
        entry = getattr(record, "discrete", None)
        for key in ("temperature", "samples"):
            part = entry.get(key) if isinstance(entry, dict) else None
            names.update(part if isinstance(part, dict) else ())
    return names


def _window_values(history: Sequence[StepRecord], fraction: float,
                   discrete: Collection[str] | None = None
                   ) -> tuple[int, dict[str, tuple[Any, Any]]]:
    """The window ``k`` and each numeric, continuous hyperparameter's values ``(first, last)``
    in it (``discrete``: the names left out, default :func:`discrete_in`)."""
    good = [record for record in history if record.status == "ok"]
    skipped = discrete_in(history) if discrete is None else set(discrete)
    window = max(2, math.ceil(fraction * len(good)))
    if len(good) <= window:
        return 0, {}
    first, last = good[-1 - window].hparams, good[-1].hparams
    pairs = {}
    for name, value in last.items():
        if name in skipped:
            continue
        old = first.get(name)
        numeric = isinstance(value, float) or (
            isinstance(value, list) and all(isinstance(x, float) or x is None for x in value))
        same_shape = (isinstance(value, float) and isinstance(old, float)) or (
            isinstance(value, list) and isinstance(old, list) and len(value) == len(old))
        if numeric and same_shape:
            pairs[name] = (old, value)
    return window, pairs


def still_moving(history: Sequence[StepRecord], *, threshold: float = THRESHOLD,
                 fraction: float = FRACTION, label: str = "outer steps",
                 discrete: Collection[str] | None = None) -> str | None:
    """A warning naming the continuous hyperparameters whose relative change over the last
    ``fraction`` of the steps exceeds ``threshold``, or ``None`` when none does; ``label``
    names the steps of ``history`` (``"gradient-phase steps"`` when a global phase's points
    were left out: ``over the last 2 of the 3 gradient-phase steps``); ``discrete``: the
    discrete names, left out (default: those the records name, :func:`discrete_in`).

    >>> from dataclasses import replace
    >>> base = StepRecord(0, {"lr": 1.0}, "ok", 1.0, 1.0, 0.0, None, 1.0, None, None, 0.1,
    ...                   True, 1, "", 0.0, 0.0)
    >>> still_moving([replace(base, step=s, hparams={"lr": 1.0 + s}) for s in range(5)])
    'still moving: lr changed by 67% over the last 2 of 5 outer steps (threshold 10%)'
    """
    window, pairs = _window_values(history, fraction, discrete)
    changes = {name: relative_change(old, new) for name, (old, new) in pairs.items()}
    moving = {name: change for name, change in changes.items() if change > threshold}
    if not moving:
        return None
    names = ", ".join(f"{name} changed by {change:.0%}" if math.isfinite(change) else
                      f"{name} moved from 0 by {absolute_change(*pairs[name]):.3g}"
                      for name, change in moving.items())
    steps = sum(record.status == "ok" for record in history)
    of = f"{steps} {label}" if label == "outer steps" else f"the {steps} {label}"
    return (f"still moving: {names} over the last {window} of {of} "
            f"(threshold {threshold:.0%})")

__all__ = ["FRACTION", "THRESHOLD", "absolute_change", "discrete_in", "recent_changes",
           "relative_change", "still_moving"]
