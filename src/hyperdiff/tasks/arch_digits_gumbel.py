"""``arch_digits`` with its discrete hyperparameters differentiated by straight-through
Gumbel-softmax (one sample per training).

See :mod:`hyperdiff.tasks.arch_digits`; ``hyperdiff compare --task arch_digits_gumbel``.
"""

from __future__ import annotations

from typing import Any

from ..discrete.report import DiscreteTask
from . import arch_digits

SUMMARY = "arch_digits, discrete choices by gumbel"
TUNES = arch_digits.TUNES
DEFAULTS = {**arch_digits.DEFAULTS, "outer.samples": 1}


def build(**options: Any) -> DiscreteTask:
    """:func:`hyperdiff.tasks.arch_digits.build` with mode="gumbel"."""
    return arch_digits.build(mode="gumbel", **options)
