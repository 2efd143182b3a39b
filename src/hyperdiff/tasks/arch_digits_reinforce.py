"""``arch_digits`` with its discrete hyperparameters differentiated by REINFORCE (4 plain
sampled architectures per outer step, leave-one-out baseline).

See :mod:`hyperdiff.tasks.arch_digits`; ``hyperdiff compare --task arch_digits_reinforce``.
"""

from __future__ import annotations

from typing import Any

from ..discrete.report import DiscreteTask
from . import arch_digits

SUMMARY = "arch_digits, discrete choices by reinforce"
TUNES = arch_digits.TUNES
DEFAULTS = {**arch_digits.DEFAULTS, "outer.samples": 4, "stop.max_steps": 12}


def build(**options: Any) -> DiscreteTask:
    """:func:`hyperdiff.tasks.arch_digits.build` with REINFORCE and a leave-one-out baseline."""
    return arch_digits.build(mode="reinforce", baseline="leave_one_out", **options)
