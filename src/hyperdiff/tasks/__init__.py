"""Built-in tuning tasks on data bundled with scikit-learn (nothing downloads).

Each task module defines ``SUMMARY`` (one line), ``TUNES`` (what it tunes), ``DEFAULTS``
(config values it recommends, as dotted keys) and
``build(*, steps, selection_fraction, cv_folds, data_seed) -> Task``.
Adding a task is one module and one line in :data:`TASKS`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..errors import HyperdiffError
from .base import SearchRange, Task

TASKS: dict[str, str] = {
    "ridge_diabetes": "hyperdiff.tasks.ridge",
    "logistic_cancer": "hyperdiff.tasks.logistic",
    "logistic_digits": "hyperdiff.tasks.logistic_digits",
    "mlp_digits": "hyperdiff.tasks.mlp",
    "reweight_digits": "hyperdiff.tasks.reweight",
    "arch_digits": "hyperdiff.tasks.arch_digits",
    "arch_digits_gumbel": "hyperdiff.tasks.arch_digits_gumbel",
    "arch_digits_reinforce": "hyperdiff.tasks.arch_digits_reinforce",
}
DEFAULT_TASK = "reweight_digits"


def task_module(name: str) -> ModuleType:
    """The module that defines task ``name``."""
    if name not in TASKS:
        raise HyperdiffError(f"tasks: name must be one of {list(TASKS)} (got {name!r})")
    return importlib.import_module(TASKS[name])


def build_task(name: str, **options: Any) -> Task:
    """Build task ``name``; ``options`` go to its ``build`` (steps, selection_fraction, ...)."""
    return task_module(name).build(**options)


def task_defaults(name: str) -> dict[str, Any]:
    """The config values (dotted keys) that task ``name`` recommends."""
    return dict(task_module(name).DEFAULTS)


def list_tasks() -> list[tuple[str, str, str]]:
    """``(name, what it tunes, summary)`` of every built-in task."""
    return [(name, task_module(name).TUNES, task_module(name).SUMMARY) for name in TASKS]


__all__ = ["DEFAULT_TASK", "TASKS", "SearchRange", "Task", "build_task", "list_tasks",
           "task_defaults", "task_module"]
