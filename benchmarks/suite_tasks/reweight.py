"""The noisy-label reweighting task: hyperdiff's built-in ``reweight_digits`` (an MLP on
scikit-learn's digits with 30% of the training labels flipped, one weight per training
example), reused as it is, except that its recommended outer-loop settings are dropped so that
it runs with the same defaults as every other suite task.

It has no learning-rate hyperparameter (the inner SGD's lr is fixed), so it has no starts
10x / 100x off and no lr grid.

    hyperdiff run --task benchmarks/suite_tasks/reweight.py:build
"""

from __future__ import annotations

from dataclasses import replace

import hyperdiff as hd
from hyperdiff.app.tasks import reweight

NAME = "reweight_digits"
DEFAULT_STEPS = reweight.DEFAULT_STEPS
LR_NAME = None


def build(steps: int | None = None, data_seed: int = 0) -> hd.tasks.TaskSpec:
    """The built-in task with ``defaults`` reduced to its inner steps."""
    steps = DEFAULT_STEPS if steps is None else steps
    spec = reweight.build(steps=steps, data_seed=data_seed)
    return replace(spec, defaults={"inner.steps": steps})
