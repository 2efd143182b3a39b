"""Where an online run's windows end: K steps each, or longer and longer as the run goes on.

With ``growth = c > 0`` a window that starts at inner step ``t`` trains ``K + floor(c t)`` steps:
dense hypergradients while the values move the most (the first windows are K steps), sparse ones
later, each window a fraction ``c`` of the steps trained before it longer. The windows grow
geometrically (by about ``1 + c`` each), so a run of N steps has about ``log(1 + c N / K) /
log(1 + c)`` of them instead of ``N / K``: the per-window costs (the exact last step, the
validation loss, the outer step and its record) are paid that many times. A last window shorter
than K is merged into the one before it. ``growth = 0`` is ``ceil(N / K)`` windows of K steps
(the last one shorter), as before.

A window's end depends only on where it starts, so a run that restarts at step 0 (the hot start)
or resumes from a checkpoint finds the same windows.

>>> window_starts(100, 5, 0.2)
[0, 5, 11, 18, 26, 36, 48, 62, 79]
>>> window_stop(79, 100, 5, 0.2)
100
"""

from __future__ import annotations

import math
from bisect import bisect_right
from fractions import Fraction


def grown(growth: float, start: int) -> int:
    """``floor(growth * start)`` of the decimal ``growth`` as written (``0.7 * 90`` is
    62.99999999999999 in floats, and ``int`` of it 62, not 63).

    >>> grown(0.7, 90), int(0.7 * 90), grown(0.2, 79)
    (63, 62, 15)
    """
    return math.floor(Fraction(repr(float(growth))) * start)


def window_stop(start: int, steps: int, window: int, growth: float = 0.0) -> int:
    """The end (exclusive) of the window that starts at inner step ``start`` of ``steps``."""
    stop = min(start + window + grown(growth, start), steps)
    if growth > 0 and steps - stop < window:
        return steps  # no last window shorter than K: it joins this one
    return stop


def window_starts(steps: int, window: int, growth: float = 0.0) -> list[int]:
    """The first inner step of every window of a run of ``steps`` steps."""
    starts = [0]
    while (stop := window_stop(starts[-1], steps, window, growth)) < steps:
        starts.append(stop)
    return starts


def window_index(start: int, steps: int, window: int, growth: float = 0.0) -> int:
    """The index of the window that contains inner step ``start`` (``t // K`` without growth)."""
    if growth == 0:
        return start // window
    return bisect_right(window_starts(steps, window, growth), start) - 1


__all__ = ["window_index", "window_starts", "window_stop"]
