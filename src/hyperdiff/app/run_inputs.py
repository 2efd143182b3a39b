"""What a resume verifies about the task's inputs, for :mod:`hyperdiff.app.experiment`: the
fingerprints of the task's code and data splits (:mod:`hyperdiff.app.tasks.inputs`) recorded in
the run's manifest, compared with those of today; a change is refused unless
``--accept-changed-inputs`` (see ``docs/run_directory.md``); and :func:`restore_or_start`,
which the runner calls for every run mode to resume a run or start it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.app.config import Config, load_config
from hyperdiff.app.rundir import RunDir
from hyperdiff.app.rundir.directory import describe
from hyperdiff.app.rundir.records import new_run, shell_path
from hyperdiff.app.tasks import Task, factory_defaults, task_inputs
from hyperdiff.app.tasks.inputs import input_changes
from hyperdiff.app.tasks.loader import absolute_reference
from hyperdiff.errors import HyperdiffError
from hyperdiff.logs import get_logger
from hyperdiff.version import __version__

_LOG = get_logger("experiment")

ACCEPT_FLAG = "--accept-changed-inputs"


def with_absolute_task(config: Config) -> Config:
    """``config`` with a task file's path made absolute, so that a resume from another working
    directory loads the same file."""
    name = absolute_reference(config.task.name)
    return config if name == config.task.name else replace(
        config, task=replace(config.task, name=name))


def run_inputs(config: Config) -> dict[str, Any]:
    """Fingerprints of the task's code (with its params) and data splits (the task must be
    built already)."""
    return task_inputs(config.task.name, steps=config.inner.steps,
                       data_seed=config.task.data_seed, version=__version__,
                       params=config.task.params)


def changed_inputs_error(rundir: RunDir, changes: list[str]) -> HyperdiffError:
    return HyperdiffError(
        f"run: --resume must use the inputs the run was started with; {rundir.path}: "
        f"{'; '.join(changes)}. Restore them, resume with {ACCEPT_FLAG} to continue with the "
        "changed inputs (the steps before and after the resume then saw different inputs), or "
        "start a new run with --out NEW_DIR"
    )


def verify_inputs(rundir: RunDir, inputs: dict[str, Any], *, step: int, accept: bool
                  ) -> dict[str, Any] | None:
    """Compare ``inputs`` with those the manifest records: a change is an error unless
    ``accept``; return the accepted change ``{"step", "changes"}``, else ``None``."""
    recorded = rundir.recorded_inputs()
    if recorded is None:
        _LOG.warning("%s was written before hyperdiff recorded fingerprints of the task's code "
                     "and data, so this resume cannot verify them; they are recorded now",
                     rundir.path)
        return None
    changes = input_changes(recorded, inputs)
    if changes and not accept:
        raise changed_inputs_error(rundir, changes)
    if changes:
        _LOG.warning("resuming %s at step %d with changed inputs (%s): %s", rundir.path, step,
                     ACCEPT_FLAG, "; ".join(changes))
        return {"step": step, "changes": changes}
    return None


def input_change_warnings(rundir: RunDir) -> list[str]:
    """One warning per resume that accepted changed inputs (for the result)."""
    return [f"resumed at step {c.get('step')} with changed inputs ({ACCEPT_FLAG}): "
            f"{'; '.join(c.get('changes', []))}" for c in rundir.input_changes()]


def extension_pending(stored: Config, finished: dict[str, Any] | None) -> bool:
    """Whether the result ``finished`` is of the budget before an extension that has not
    finished yet: it stopped on its budget below the ``stop.max_steps`` the run's config
    ``stored`` has now (an extension killed, or one that failed to start)."""
    steps = None if finished is None else finished.get("steps")
    return (finished is not None and finished.get("status") == "finished"
            and isinstance(steps, int) and steps < stored.stop.max_steps
            and str(finished.get("stop_reason", "")).startswith("budget:"))


def tuned_values(source: RunDir, config: Config) -> dict[str, Any]:
    """``{"run", "raw"}``: the best raw values of the finished offline run ``source`` (from
    its last checkpoint, exactly), for ``--from``; also of one whose guard gave up after a
    good step (``"diverged"``: its best step before the failures); refused when ``source`` is
    unfinished, of another mode, of another task than ``config``'s, or of the task with other
    params or another ``task.data_seed`` (as ``hd.tuned_hparams`` refuses them)."""
    stored = with_absolute_task(load_config(source.config_path(), stored=True))
    if stored.task.name != config.task.name:
        raise HyperdiffError(f"run: --from must name a run of task {config.task.name!r} (got "
                             f"{source.path}, a run of {stored.task.name!r})")
    same_task_inputs(source, stored, config)
    finished = source.read_result()
    if extension_pending(stored, finished):
        raise HyperdiffError(f"run: --from must name a finished offline run (got {source.path}, "
                             f"whose extension to {stored.stop.max_steps} steps has not "
                             f"finished: resume it first, `hyperdiff run --resume "
                             f"{shell_path(source.path)}`)")
    if stored.outer.mode != "offline" or finished is None or finished.get(
            "status") not in ("finished", "diverged"):
        raise HyperdiffError(f"run: --from must name a finished offline run (got {source.path}"
                             f", {stored.outer.mode} and "
                             f"{'unfinished' if finished is None else finished.get('status')})")
    state = source.load_checkpoint()
    if state is None or not isinstance(state.get("best"), dict):
        if finished.get("status") == "diverged":
            raise HyperdiffError(f"run: --from must name a run with a good step (got "
                                 f"{source.path}, which diverged before its first)")
        raise HyperdiffError(f"run: --from {source.path} holds no checkpoint with a best "
                             "step; resume it first")
    raw = {name: value.tolist() for name, value in state["best"]["raw"].items()}
    return {"run": str(source.path), "raw": raw, "hparams": source.read_hparams()}


def same_task_inputs(source: RunDir, stored: Config, config: Config) -> None:
    """Refuse a ``--from`` run made with other task params or another ``task.data_seed``
    than ``config``: its raw values were tuned on other data (per-example weights would land
    on other examples) or for another task."""
    ours, theirs = dict(config.task.params), dict(stored.task.params)
    defaults = {} if ours == theirs else factory_defaults(config.task.name)
    if {**defaults, **theirs} != {**defaults, **ours}:  # a default written out matches
        raise HyperdiffError(
            f"run: --from must name a run of task {config.task.name!r} with the task's params "
            f"{dict(config.task.params)} (got {source.path}, a run with the params "
            f"{dict(stored.task.params)}); start with the run's params (--set "
            "task.params.NAME=VALUE), or without --from")
    if stored.task.data_seed != config.task.data_seed:
        raise HyperdiffError(
            f"run: --from must name a run with task.data_seed = {config.task.data_seed} (got "
            f"{source.path}, a run with task.data_seed = {stored.task.data_seed}, whose tuned "
            "values were fitted to other splits: a per-example weight would land on another "
            f"example); start with --set task.data_seed={stored.task.data_seed}, or without "
            "--from")


def description_differences(ours: dict[str, Any], theirs: dict[str, Any]
                            ) -> dict[str, str]:
    """Hyperparameter name -> how ``theirs`` (a run's ``hparams.json``) differs from
    ``ours``; an entry that ``theirs`` does not record (``constraint_settings`` before s40)
    is not compared."""
    out = {}
    for name in sorted(set(ours) | set(theirs)):
        mine, other = ours.get(name), theirs.get(name)
        if not isinstance(mine, dict) or not isinstance(other, dict):
            out[name] = "not in the run" if other is None else (
                "not in the task" if mine is None else "damaged in the run")
            continue
        keys = [k for k in mine if k in other and mine[k] != other[k]]
        if any(k in keys for k in ("constraint", "constraint_settings")):
            out[name] = (f"the constraint {constraint_text(mine)} here, "
                         f"{constraint_text(other)} in the run")
        elif keys:
            out[name] = "; ".join(f"{k} {mine[k]!r} here, {other[k]!r} in the run"
                                  for k in keys)
    return out


def constraint_text(entry: dict[str, Any]) -> str:
    """``interval(low=0.0, high=1.0)``: a described constraint, with its settings if
    recorded."""
    settings = entry.get("constraint_settings")
    inner = ", ".join(f"{k}={v!r}" for k, v in settings.items()) if isinstance(
        settings, dict) else ""
    return f"{entry.get('constraint')}({inner})" if inner else str(entry.get("constraint"))


def starting_at(task: Task, start: dict[str, Any]) -> Task:
    """``task`` with its initial raw values replaced by ``start["raw"]`` (names, kinds,
    constraints with their settings, and sizes must match those ``start["hparams"]``
    records, as far as it records them)."""
    differ = description_differences(describe(task.hparams), start["hparams"])
    if differ:
        detail = "; ".join(f"{name!r}: {how}" for name, how in list(differ.items())[:3])
        raise HyperdiffError(
            f"run: --from must name a run with the same hyperparameters (names, kinds, "
            f"constraints, sizes) as task {task.name!r}; {start['run']} differs in "
            f"{sorted(differ)} ({detail}): its raw values would mean other natural values "
            "here; start without --from, or from a run of the task as it is now")
    raw: dict[str, Tensor] = {n: torch.tensor(v, dtype=torch.float64, device="cpu")
                              for n, v in start["raw"].items()}
    hparams = task.hparams.with_raw(task.hparams.check_raw(raw))
    return replace(task, problems=tuple(replace(p, hparams=hparams) for p in task.problems))


def restore_or_start(rundir: RunDir, config: Config, hparams: Any, loop: Any, *,
                     resume: bool, accept_changed_inputs: bool = False,
                     start: dict[str, Any] | None = None) -> bool:
    """Load the run's last checkpoint into ``loop`` (a :class:`HyperOptimizer` with either
    plan) when resuming one, else write the start files of a new run (with ``start``, the
    values ``--from`` starts it at); True when resumed. A checkpoint that does not fit
    ``loop`` is one clear error, and so are changed inputs (the task's code or data) unless
    ``accept_changed_inputs``."""
    inputs = run_inputs(config)
    if not (resume and (state := rundir.load_checkpoint()) is not None):
        rundir.start(config.to_toml(), hparams, inputs, start)
        return False
    unrecorded = rundir.recorded_inputs() is None
    change = verify_inputs(rundir, inputs, step=int(state["step"]),
                           accept=accept_changed_inputs)
    history = rundir.load_history(int(state["step"]))
    try:
        loop.load_state_dict(state, history)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        what = str(err) if isinstance(err, HyperdiffError) else f"{type(err).__name__}: {err}"
        raise HyperdiffError(
            f"run directory: {rundir.file('checkpoint.pt')} does not fit this run's driver "
            f"({what}); restore it, or {new_run(rundir.path)}"
        ) from None
    if unrecorded or change is not None:
        rundir.record_inputs(inputs, change)
    return True


__all__ = ["ACCEPT_FLAG", "changed_inputs_error", "constraint_text", "description_differences",
           "extension_pending", "input_change_warnings", "restore_or_start", "run_inputs",
           "same_task_inputs", "starting_at", "tuned_values", "verify_inputs",
           "with_absolute_task"]
