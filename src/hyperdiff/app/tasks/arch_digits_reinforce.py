"""``arch_digits`` with its discrete hyperparameters differentiated by REINFORCE (4 plain
sampled architectures per outer step, leave-one-out baseline).

See :mod:`hyperdiff.app.tasks.arch_digits`; ``hyperdiff compare --task arch_digits_reinforce``.
"""

from __future__ import annotations

from hyperdiff.app.tasks import arch_digits
from hyperdiff.app.tasks.spec import TaskSpec

SUMMARY = "arch_digits, discrete choices by reinforce"
TUNES = arch_digits.TUNES
DEFAULTS = {**arch_digits.DEFAULTS, "outer.samples": 4, "stop.max_steps": 12}


def build(*, steps: int = arch_digits.DEFAULT_STEPS, data_seed: int = 0) -> TaskSpec:
    """:func:`hyperdiff.app.tasks.arch_digits.build` with REINFORCE and a leave-one-out baseline."""
    return arch_digits.named_build("arch_digits_reinforce", steps=steps, data_seed=data_seed,
                                   mode="reinforce", baseline="leave_one_out")
