"""Tuning tasks: the public task API (:func:`task`) and the built-in tasks, which use it.

A task is named by a reference (:mod:`.loader`): a built-in name (``ridge_diabetes``), or a
factory in the user's code, ``package.module:build`` or ``path/to/file.py:build``. Each
built-in task module defines ``SUMMARY`` (one line), ``TUNES`` (what it tunes), ``DEFAULTS``
(config values it recommends, as dotted keys) and ``build(*, steps, data_seed) -> TaskSpec``.
Adding a built-in task is one module and one line in :data:`TASKS`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from hyperdiff.app.tasks import loader
from hyperdiff.app.tasks.base import SearchChoices, SearchRange, Task
from hyperdiff.app.tasks.inputs import code_fingerprint, data_fingerprints, model_fingerprint
from hyperdiff.app.tasks.spec import GivenSplits, TaskData, TaskSpec, given_splits, task
from hyperdiff.app.tasks.splits import check_data_seed
from hyperdiff.engine.task_distribution import TaskDistribution
from hyperdiff.engine.task_distribution import task_distribution as distribution
from hyperdiff.errors import UNIT_OPEN_HIGH, HyperdiffError, nonnegative_int, number, positive_int

TASKS: dict[str, str] = {
    "ridge_diabetes": "hyperdiff.app.tasks.ridge",
    "logistic_cancer": "hyperdiff.app.tasks.logistic",
    "logistic_digits": "hyperdiff.app.tasks.logistic_digits",
    "mlp_digits": "hyperdiff.app.tasks.mlp",
    "reweight_digits": "hyperdiff.app.tasks.reweight",
    "arch_digits": "hyperdiff.app.tasks.arch_digits",
    "arch_digits_gumbel": "hyperdiff.app.tasks.arch_digits_gumbel",
    "arch_digits_reinforce": "hyperdiff.app.tasks.arch_digits_reinforce",
    "horizon_digits": "hyperdiff.app.tasks.horizon",
    "sinusoid_maml": "hyperdiff.app.tasks.sinusoid_maml",
    "glyphs_maml": "hyperdiff.app.tasks.glyphs_maml",
}
DEFAULT_TASK = "reweight_digits"


def check_task_name(name: str, what: str = "tasks: name") -> str:
    """``name`` if it is a built-in task or looks like a factory reference, else raise
    (the message starts with ``what``)."""
    if name in TASKS:
        return name
    if loader.is_reference(name):
        loader.split_reference(name)
        return name
    close = difflib.get_close_matches(name, list(TASKS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    if ":" not in name and (name.endswith(".py") or "." in name):  # a reference without factory
        hint = f" (did you mean {name + ':build'!r}, naming the factory function?)"
    raise HyperdiffError(
        f"{what} must be one of {list(TASKS)}, or 'package.module:factory' / "
        f"'path/to/file.py:factory' naming your own task (got {name!r}){hint}"
    )


def task_module(name: str) -> ModuleType:
    """The module that defines built-in task ``name``."""
    if name not in TASKS:
        check_task_name(name)
        raise HyperdiffError(f"tasks: {name!r} must be a built-in task name, one of "
                             f"{list(TASKS)}")
    return importlib.import_module(TASKS[name])


def factory_reference(name: str) -> str:
    """``module:build`` of a built-in task, the reference itself otherwise."""
    return f"{TASKS[name]}:build" if name in TASKS else check_task_name(name)


def factory_defaults(name: str) -> dict[str, Any]:
    """The defaults of the params that task ``name``'s factory (a built-in name, a
    ``file.py:build``) takes; ``{}`` for a task that is no factory, or one that cannot be
    imported here. Params compared with them filled in on both sides match where one side
    writes a default out (``params={"hidden": 32}``) and the other leaves it out."""
    try:
        factory = loader.resolve_factory(factory_reference(name))
        signature = {} if isinstance(factory, TaskSpec) else inspect.signature(factory).parameters
    except (HyperdiffError, TypeError, ValueError):
        return {}
    return {key: p.default for key, p in signature.items()
            if key not in loader.RESERVED and p.default is not p.empty
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def load_task_spec(name: str, *, steps: int | None = None, data_seed: int = 0,
                   params: Mapping[str, Any] | None = None) -> TaskSpec:
    """The :class:`TaskSpec` that task ``name`` (built-in or reference) describes, its factory
    called with ``params`` as keyword arguments."""
    return loader.load_spec(name, factory_reference(name), steps=steps, data_seed=data_seed,
                            params=params)


def check_task_params(name: str, params: Mapping[str, Any], *, caller: str, prefix: str
                      ) -> list[str]:
    """Refuse ``params`` that task ``name``'s factory does not take (one message per kind of
    mistake, naming ``prefix + key`` and the params it accepts, with a did-you-mean), a
    reserved name (``steps``, ``data_seed``: set by ``inner.steps`` and ``task.data_seed``),
    a missing required one and a value its annotation refuses (``meta_sgd="no"`` for a
    ``bool``); return the names the factory accepts (``**kwargs``: any)."""
    if not isinstance(params, Mapping):
        raise HyperdiffError(f"{caller}: {prefix.rstrip('.')} must be a table of the task "
                             f"factory's keyword arguments (got {params!r})")
    factory = loader.resolve_factory(factory_reference(name))
    accepted, required, any_name = loader.factory_parameters(factory)
    owner = f"task {name!r}" + ("" if name in TASKS else " (its factory)")
    for key in params:
        if key in loader.RESERVED:
            setting = "inner.steps" if key == "steps" else "task.data_seed"
            raise HyperdiffError(f"{caller}: {prefix}{key} must not be given; hyperdiff passes "
                                 f"{key} to the factory from {setting} (set that instead)")
        if not any_name and key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise HyperdiffError(f"{caller}: unknown key {prefix}{key}; {owner} accepts the "
                                 f"params {', '.join(accepted) or 'none'}{hint}")
    missing = [key for key in required if key not in params]
    if missing:
        raise HyperdiffError(f"{caller}: {prefix}{missing[0]} must be given; {owner} takes it "
                             "without a default")
    if not isinstance(factory, TaskSpec):
        loader.check_types(caller, prefix, params, loader.type_hints(factory))
    return accepted


def build_task(name: str, *, steps: int | None = None, selection_fraction: float = 0.5,
               cv_folds: int = 0, data_seed: int = 0,
               params: Mapping[str, Any] | None = None) -> Task:
    """Build task ``name`` (built-in, ``module:factory`` or ``file.py:factory``), its factory
    called with ``params`` (``[task.params]``) as keyword arguments, which it keeps in
    ``task.info["params"]`` (``hd.tuned_hparams`` checks them against a run's)."""
    caller = f"task {name}"
    if steps is not None:  # None: the task's default; 0 is not
        positive_int(caller, "steps", steps)
    number(caller, "selection_fraction", selection_fraction, UNIT_OPEN_HIGH)
    nonnegative_int(caller, "cv_folds", cv_folds)
    check_data_seed(caller, data_seed)
    check_task_params(name, params or {}, caller=caller, prefix="params.")
    params = dict(params or {})
    spec = load_task_spec(name, steps=steps, data_seed=data_seed, params=params)
    task = spec.build(steps=steps, selection_fraction=selection_fraction, cv_folds=cv_folds,
                      data_seed=data_seed)
    task.info["params"] = params
    task.info["data_seed"] = data_seed
    return task


def task_inputs(name: str, *, steps: int | None, data_seed: int, version: str,
                params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fingerprints of task ``name``'s code (with its ``params``) and of each of its data
    splits, which a resumed run verifies (see :mod:`.inputs`); the spec comes from the cache
    that ``build_task`` filled."""
    spec = load_task_spec(name, steps=steps, data_seed=data_seed, params=params)
    code = code_fingerprint(name, builtin=name in TASKS, version=version, params=params)
    model = model_fingerprint(spec.model)
    return {"task": code if model is None else {**code, "model": model},
            "data": data_fingerprints(spec)}


def task_defaults(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config values (dotted keys) that task ``name`` recommends; for a user task its
    ``defaults`` and ``inner.steps = steps`` (this calls its factory, with ``params``)."""
    if name in TASKS:
        return dict(task_module(name).DEFAULTS)
    spec = load_task_spec(name, params=params)
    return {"inner.steps": spec.steps, **spec.defaults}


def task_params_line(name: str) -> str:
    """The parameters the factory of built-in task ``name`` takes (``[task.params]``), with
    their defaults: ``"hidden=64, meta_sgd=False"``; ``""`` for none."""
    factory = loader.resolve_factory(factory_reference(name))
    if isinstance(factory, TaskSpec):
        return ""
    accepted, _, _ = loader.factory_parameters(factory)
    defaults = {k: p.default for k, p in inspect.signature(factory).parameters.items()}
    return ", ".join(name if defaults[name] is inspect.Parameter.empty
                     else f"{name}={defaults[name]!r}" for name in accepted)


def list_tasks() -> list[tuple[str, str, str]]:
    """``(name, what it tunes, summary)`` of every built-in task."""
    return [(name, task_module(name).TUNES, task_module(name).SUMMARY) for name in TASKS]


__all__ = ["DEFAULT_TASK", "TASKS", "GivenSplits", "SearchChoices", "SearchRange", "Task",
           "TaskData", "TaskDistribution", "TaskSpec", "build_task", "check_task_name",
           "check_task_params", "distribution", "factory_defaults", "given_splits", "list_tasks",
           "load_task_spec",
           "task", "task_defaults", "task_inputs", "task_module", "task_params_line"]
