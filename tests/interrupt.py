"""One helper shared by the resume tests: a ``hyperdiff run`` stopped by Ctrl-C at a step."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.online import OnlineTuner


def interrupted_run(out: Path, settings: list[str], *, at: int) -> None:
    """``hyperdiff run`` of ``settings`` into ``out``, interrupted (Ctrl-C) when outer step
    (offline) or hyper-step (online) ``at`` is about to start."""
    offline, online = HyperOptimizer.step, OnlineTuner.step

    def offline_step(self):
        if self.step_index == at:
            raise KeyboardInterrupt
        return offline(self)

    def online_step(self):
        if self.hyper_step == at:
            raise KeyboardInterrupt
        return online(self)

    HyperOptimizer.step = offline_step  # type: ignore[method-assign]
    OnlineTuner.step = online_step  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(load_config(overrides=settings), out=out, log=lambda _: None,
                           progress=False)
    finally:
        HyperOptimizer.step = offline  # type: ignore[method-assign]
        OnlineTuner.step = online  # type: ignore[method-assign]
