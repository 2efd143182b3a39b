"""One helper shared by the resume tests: a ``hyperdiff run`` stopped by Ctrl-C at a step."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.tuner.driver import HyperOptimizer


def interrupted_run(out: Path, settings: list[str], *, at: int) -> None:
    """``hyperdiff run`` of ``settings`` into ``out``, interrupted (Ctrl-C) when outer step
    (offline) or hyper-step (online) ``at`` is about to start: both plans run in the one
    loop, whose ``step_index`` counts either."""
    step = HyperOptimizer.step

    def interrupted_step(self):
        if self.step_index == at:
            raise KeyboardInterrupt
        return step(self)

    HyperOptimizer.step = interrupted_step  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(load_config(overrides=settings), out=out, log=lambda _: None,
                           progress=False)
    finally:
        HyperOptimizer.step = step  # type: ignore[method-assign]
