"""``arch_digits`` with its discrete hyperparameters differentiated by straight-through
Gumbel-softmax (one sample per training).

See :mod:`hyperdiff.app.tasks.arch_digits`; ``hyperdiff compare --task arch_digits_gumbel``.
"""

from __future__ import annotations

from hyperdiff.app.tasks import arch_digits
from hyperdiff.app.tasks.spec import TaskSpec

SUMMARY = "arch_digits, discrete choices by gumbel"
TUNES = arch_digits.TUNES
DEFAULTS = {**arch_digits.DEFAULTS, "outer.samples": 1}


def build(*, steps: int = arch_digits.DEFAULT_STEPS, data_seed: int = 0) -> TaskSpec:
    """:func:`hyperdiff.app.tasks.arch_digits.build` with mode="gumbel"."""
    return arch_digits.named_build("arch_digits_gumbel", steps=steps, data_seed=data_seed,
                                   mode="gumbel")
