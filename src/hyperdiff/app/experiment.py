"""A configured tuning job end to end: task, outer loop, run directory, final report.

:func:`run_experiment` is what ``hyperdiff run`` does, for every ``outer.mode``: take the run
directory and its lock, check or record the inputs, build the task and the outer loop through
the mode's plan (:data:`~hyperdiff.app.plans.PLANS`), run it with a checkpoint after every step
(or resume one), then retrain at the initial and at the tuned hyperparameters with fresh seeds
and report every split, the held-out test split included, for both (:func:`final_report`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing, nullcontext, suppress
from pathlib import Path
from typing import Any

from hyperdiff.app.config import Config, load_config
from hyperdiff.app.loggers import close_all, config_loggers, report_all, start_all
from hyperdiff.app.plans import PLANS, Plan, Summary, build, held_out_split
from hyperdiff.app.run_inputs import (
    ACCEPT_FLAG,
    changed_inputs_error,
    extension_pending,
    input_change_warnings,
    restore_or_start,
    run_inputs,
    tuned_values,
    with_absolute_task,
)
from hyperdiff.app.rundir import RunDir
from hyperdiff.app.rundir.paths import below_working_dir
from hyperdiff.app.rundir.records import shell_path
from hyperdiff.app.tasks import Task
from hyperdiff.app.tasks.inputs import task_file_change
from hyperdiff.app.tasks.loader import forget_specs, label
from hyperdiff.errors import HyperdiffError, NonFiniteError
from hyperdiff.logs import get_logger
from hyperdiff.seeds import report_seeds
from hyperdiff.tuner.budget import still_moving
from hyperdiff.tuner.distributed import init_from_env, root_only
from hyperdiff.tuner.distributed.group import Group
from hyperdiff.tuner.distributed.spread import LocalSpreader, RankSpreader, Spreader
from hyperdiff.tuner.history import StepRecord, natural_values

_LOG = get_logger("experiment")




def _best_so_far(loop: Any) -> dict[str, Any]:
    """A diverged run's best step so far (a plan that ranks steps and had one): its step,
    ranking loss and natural values, for ``result.json``; ``{}`` otherwise."""
    if not loop.plan.ranks or loop.best is None:
        return {}
    best = loop.best
    return {"best_step": best["step"], "best_loss": best["value"],
            "best_values": natural_values(loop.hparams, best["raw"])}


def new_run_dir(config: Config, out: str | Path | None = None) -> RunDir:
    """The directory of a new run: ``out``, else ``config.output.dir``, else a fresh
    ``runs/<task>-<date>-<time>`` (with ``-2``, ``-3``, ... when that name is taken),
    created atomically. ``out`` (the command line's ``--out``) may be anywhere;
    ``output.dir`` (a config file's) must stay below the working directory."""
    if out:
        return RunDir.create(out)
    if config.output.dir:
        return RunDir.create(below_working_dir(config.output.dir, "config: output.dir"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RunDir.create_unique("runs", f"{label(config.task.name)}-{stamp}")


def config_differences(old: Config, new: Config) -> list[str]:
    """``"section.key: old -> new"`` for every key that differs (``[output]`` ignored)."""
    a, b = old.to_dict(), new.to_dict()
    diffs = []
    for section in a:
        if section == "output":
            continue
        for key in sorted(set(a[section]) | set(b[section])):
            if a[section].get(key) != b[section].get(key):
                diffs.append(f"{section}.{key}: {a[section].get(key)!r} there, "
                             f"{b[section].get(key)!r} now")
    return diffs


def run_experiment(
    config: Config | None, *, out: str | Path | None = None, resume: str | Path | None = None,
    overrides: tuple[str, ...] = (), progress: bool | None = None,
    log: Callable[[str], None] | None = None, callbacks: Sequence[Callable[..., Any]] = (),
    accept_changed_inputs: bool = False, start_from: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) a tuning job; return the result written to ``result.json``.

    Args:
        config: the resolved config; with ``resume`` and ``None``, the run's own config.
        out: run directory of a new run (default: ``config.output.dir`` or
            ``runs/<task>-<date>-<time>``).
        resume: run directory of an interrupted run to continue. Its config must equal
            ``config`` (except ``[output]``), else the resume is refused.
        overrides: ``section.key=value`` applied to the stored config when resuming without
            ``config``.
        progress: tqdm progress bar over the outer steps and the final report's trainings
            (``None``: only on a terminal).
        log: progress messages go to the ``hyperdiff.experiment`` logger at INFO level (the
            CLI shows them on stderr); a callable here receives them instead (kept for
            callers that silence them; prefer configuring :mod:`logging`).
        callbacks: ``callback(optimizer, record)`` after every outer step, e.g. to send
            metrics to MLflow or W&B (see :mod:`hyperdiff.app.loggers`); run after the loggers
            of ``[log]``.
        accept_changed_inputs: resume although the task's code or data changed since the run
            started (recorded in the manifest and the result's warnings); without it, a
            change is refused.
        start_from: a finished offline run of the same task whose best raw values a new
            run starts at (``--from``; recorded in the new run's manifest).

    The run directory is locked for the whole run (a second process on it is refused), and a
    resume verifies its files, the task's code and its data first (see
    ``docs/run_directory.md``).
    """
    if resume is not None and out is not None:
        raise HyperdiffError(f"run: --out must not be given with --resume (got --out {out}); "
                             f"a resumed run stays in its own directory {resume}")
    if accept_changed_inputs and resume is None:
        raise HyperdiffError(f"run: {ACCEPT_FLAG} must be given with --resume only (got it for "
                             "a new run, whose inputs are recorded as they are)")
    if start_from is not None and (resume is not None or config is None):
        raise HyperdiffError(f"run: --from must be given for a new run only (got --from "
                             f"{start_from} with --resume {resume})")
    if config is not None:
        config = with_absolute_task(config)
    start = (None if start_from is None or config is None
             else tuned_values(RunDir.existing(start_from), config))
    log = _progress(log)
    # under torchrun: rank 0 alone touches the run directory; a resume learns its timeout
    # from the stored config below
    group = init_from_env() if config is None else init_from_env(config.distributed.timeout_s)
    if group is not None and not group.is_root:
        log, progress = (lambda _message: None), False
    if resume is not None:
        forget_specs()  # the task's data as they are now, not as this process first read them
        rundir = root_only(lambda: RunDir.existing(resume))
    elif config is None:
        raise HyperdiffError("run: a config is required unless resuming")
    else:
        rundir = root_only(lambda: new_run_dir(config, out))
    try:
        with rundir.lock():
            return _run_locked(rundir, config, resume=resume is not None,
                               overrides=overrides, progress=progress, log=log,
                               callbacks=callbacks, group=group,
                               accept_changed_inputs=accept_changed_inputs, start=start)
    except HyperdiffError:  # refused (a method the task cannot use) before any step: no run
        with suppress(Exception):
            rundir.discard_unstarted()
            rundir.discard_if_unused()
        raise
    except BaseException:
        with suppress(Exception):  # e.g. a lost rank: the error being raised says more
            rundir.discard_if_unused()
        raise


def _run_locked(
    rundir: RunDir, config: Config | None, *, resume: bool, overrides: tuple[str, ...],
    progress: bool | None, log: Callable[[str], None], callbacks: Sequence[Callable[..., Any]],
    group: Any = None, accept_changed_inputs: bool = False,
    start: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if resume:
        config_path = rundir.config_path()
        # before the config is read, which imports the task: its file must be the one recorded
        change = task_file_change(rundir.recorded_inputs())
        if change is not None and not accept_changed_inputs:
            raise changed_inputs_error(rundir, [change])
        stored = with_absolute_task(load_config(config_path, stored=True))
        if config is None:
            config = with_absolute_task(load_config(data=stored.to_dict(), overrides=overrides,
                                                    stored=True))
        diffs = config_differences(stored, config)
        asked = any(o.replace(" ", "").startswith("stop.max_steps=") for o in overrides)
        extending = _extension(stored, config, diffs, rundir, asked=asked)
        if extending and config.stop.max_steps > stored.stop.max_steps:
            rundir.extend(config.to_toml(), stored.stop.max_steps, config.stop.max_steps)
            log(f"extending {rundir.path} from {stored.stop.max_steps} to "
                f"{config.stop.max_steps} outer steps")
        elif diffs:
            raise HyperdiffError(
                f"run: --resume must use the config the run was started with; {rundir.path} "
                f"differs in {'; '.join(diffs)}. Resume with no config file and no --set of "
                "those keys (an offline run's stop.max_steps alone may be raised, to extend "
                "it), or start a new run in another directory with --out"
            )
        finished = rundir.read_result()
        if finished is not None and finished.get("status") == "diverged":
            raise HyperdiffError(
                f"run: {rundir.path} must be an unfinished run to resume (got a run that "
                f"stopped after its divergence guard gave up: {finished.get('message')}); "
                "start a new run with a smaller outer.lr (or outer.clip, with an outer "
                "optimizer other than signstep, whose steps read the hypergradient's sign alone)"
            )
        if finished is not None and not extending:
            damage = result_damage(finished)
            if damage:
                raise HyperdiffError(
                    f"run directory: {rundir.file('result.json')} is damaged ({damage}); the run "
                    "finished but its result cannot be shown: delete the file and resume the "
                    "run to write it again")
            log(f"{rundir.path} already finished; its result:")
            if _logging(config) and not finished.get(LOGS_COMPLETE) and (
                    group is None or group.is_root):  # killed while they took the report
                try:
                    task, _ = PLANS[config.outer.mode].build(config, stored=True)
                    loggers = config_loggers(config.log, rundir.path, task.problems[0], config)
                    start_all(loggers, rundir.verify_history(rundir.read_history()))
                    close_all(loggers)
                    report_all(loggers, finished)  # each writes what it lacks of the report
                    finished = {**finished, LOGS_COMPLETE: True}
                    rundir.write_result(finished)
                except HyperdiffError as err:  # the stored result is still shown
                    log(f"the logs were not checked against the result ({err})")
            return _as_read_from(finished, rundir.path)
    else:
        rundir.refuse_existing_run()
    assert config is not None
    if group is not None:
        group.timeout_s = config.distributed.timeout_s
    plan = PLANS[config.outer.mode]
    plan.check(config, group)
    if resume:
        start = rundir.start_from()
    return _run_plan(plan, rundir, config, resume=resume, progress=progress, log=log,
                     callbacks=callbacks, group=group,
                     accept_changed_inputs=accept_changed_inputs, start=start)


def ranks_agree(group: Group, config: Config, start: dict[str, Any] | None) -> None:
    """Refuse ranks started with another config, hyperdiff version, task code or data, or
    another ``--from`` start than rank 0 (a torchrun job whose ranks got other arguments or
    environments): rank 0 records its own, while every rank trains its share of the steps
    with its own settings."""
    mine = {"config": config.to_dict(), "inputs": run_inputs(config),
            "start": None if start is None else start.get("raw")}
    every = group.all_gather("the ranks' configs and inputs", mine)
    root = every[0]
    for rank, theirs in enumerate(every):
        differs = [f"{section}.{key}: {root['config'][section].get(key)!r} on rank 0, "
                   f"{theirs['config'][section].get(key)!r} on rank {rank}"
                   for section in root["config"] if section != "output"
                   for key in sorted(set(root["config"][section])
                                     | set(theirs["config"].get(section, {})))
                   if root["config"][section].get(key)
                   != theirs["config"].get(section, {}).get(key)]
        differs += [f"the task's {key} fingerprint" for key in sorted(root["inputs"])
                    if theirs["inputs"].get(key) != root["inputs"][key]]
        if theirs["start"] != root["start"]:
            differs.append("the --from start values")
        if differs:
            raise HyperdiffError(
                f"run: every rank of a torchrun job must run the same config and inputs (got "
                f"rank {rank} differing from rank 0 in {'; '.join(differs[:6])}); give every "
                "rank the same arguments, environment and data")


def _as_read_from(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """A finished run's result, read from ``path``: a run directory moved or copied since it
    finished (or resumed from another working directory) names where it is now, in
    ``run_dir`` and in the commands its warnings advise."""
    stored, now = result.get("run_dir"), str(path)
    if not isinstance(stored, str) or stored == now:
        return result
    moved = dict(result, run_dir=now)
    if isinstance(result.get("warnings"), list):
        moved["warnings"] = [_readdressed(w, stored, now) for w in result["warnings"]]
    return moved


def _readdressed(text: Any, stored: str, now: str) -> Any:
    if not isinstance(text, str):
        return text
    for flag in ("--resume", "--from"):
        for old in (shell_path(stored), stored):
            text = text.replace(f"{flag} {old} ", f"{flag} {shell_path(now)} ").replace(
                f"{flag} {old}`", f"{flag} {shell_path(now)}`")
    return text


def _extension(stored: Config, config: Config, diffs: list[str], rundir: RunDir, *,
               asked: bool) -> bool:
    """Whether this resume extends the run's budget: ``stop.max_steps`` is the one changed
    key of an offline run that stopped on its budget (or has not stopped). A smaller or
    equal budget (``asked``: ``--set stop.max_steps`` was given), or an extension the run
    cannot take, is refused."""
    old, new = stored.stop.max_steps, config.stop.max_steps
    changed = len(diffs) == 1 and diffs[0].startswith("stop.max_steps:")
    if diffs and not changed:
        return False
    if not changed:  # the budget it has: an extension that was killed or failed to start?
        if extension_pending(stored, rundir.read_result()):
            return True  # finished below it: the extension goes on (recorded already)
        if not asked:
            return False  # unfinished, it resumes; or finished, its result is shown
    if new <= old:
        raise HyperdiffError(
            f"run: stop.max_steps must be larger than the run's budget {old} to extend "
            f"{rundir.path} (got {new})")
    if config.outer.mode not in ("offline", "meta"):
        raise HyperdiffError(
            f"run: stop.max_steps can be raised on --resume for outer.mode = 'offline' or "
            f"'meta' runs only (got {config.outer.mode!r}); start a new run with --out NEW_DIR")
    finished = rundir.read_result()
    if finished is not None and not str(finished.get("stop_reason", "")).startswith("budget:"):
        reason = finished.get("stop_reason") or finished.get("status")
        raise HyperdiffError(
            f"run: only a run that stopped on its step budget can be extended; {rundir.path} "
            f"stopped with {reason!r}; start a new run with --out NEW_DIR")
    return True


def _checkpoint_clock(config: Config, *, distributed: bool,
                      clock: Callable[[], float] = time.monotonic) -> Callable[[int], bool]:
    """``due(step)``: whether the checkpoint after outer step ``step`` is written: every
    ``output.checkpoint_every`` steps, once ``output.checkpoint_seconds`` have passed since the
    last one written (or since the run started). Under torchrun every rank must decide alike,
    so the seconds are not counted there. A killed run resumes from the last checkpoint and
    redoes the steps after it, which replay identically (their history lines are cut back and
    written again)."""
    every, seconds = config.output.checkpoint_every, config.output.checkpoint_seconds
    last = [clock()]

    def due(step: int) -> bool:
        if step % every:
            return False
        if not distributed and seconds > 0 and clock() - last[0] < seconds:
            return False
        last[0] = clock()
        return True

    return due


def _run_plan(
    plan: Plan, rundir: RunDir, config: Config, *, resume: bool, progress: bool | None,
    log: Callable[[str], None], callbacks: Sequence[Callable[..., Any]], group: Any,
    accept_changed_inputs: bool, start: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build ``plan``'s outer loop (at ``start``'s values, ``--from``), restore or start it,
    run it and write its result."""
    args = (config,) if start is None else (config, start)
    task, loop = plan.build(*args, stored=True) if resume else plan.build(*args)
    if group is not None:
        ranks_agree(group, config, start)
    # the [log] files are the run directory's, so rank 0 alone writes them
    loggers = (config_loggers(config.log, rundir.path, task.problems[0], config)
               if group is None or group.is_root else [])
    watchers = [*loggers, *callbacks]
    if restore_or_start(rundir, config, task.hparams, loop, resume=resume,
                        accept_changed_inputs=accept_changed_inputs, start=start):
        log(f"resuming {rundir.path} at {loop.where()}")
    elif start is not None:
        log(f"starting at the tuned values of {start['run']}")
    log(f"{plan.describe(task, loop, config)}; run directory {rundir.path}")

    saved = [-1]  # the step of the last checkpoint written
    due = _checkpoint_clock(config, distributed=group is not None)

    def save(opt: Any) -> None:
        rundir.save_checkpoint(opt.state_dict())
        saved[0] = opt.step_index

    def on_step(opt: Any, record: StepRecord) -> None:
        rundir.append(record)
        if record.status == "failed":
            log(f"guard: {record.message}")
        if due(opt.step_index) or opt.done:
            save(opt)

    bar = plan.bar(task, loop, config, progress)
    with closing(bar) if bar is not None else nullcontext():
        start_all(watchers, list(loop.history), loop)
        try:
            outcome = loop.run(callbacks=[on_step, *watchers, *([bar] if bar else [])],
                               progress=progress if bar is None else False)
        except KeyboardInterrupt as err:
            where = (f"after {loop.where()}; continue with "
                     f"`hyperdiff run --resume {shell_path(rundir.path)}`")
            log(f"interrupted {where}")
            err.add_note(where)  # the command line shows it, also when quiet
            raise
        except NonFiniteError as err:
            rundir.save_checkpoint(loop.state_dict())
            result: dict[str, Any] = {
                "task": task.name, "status": "diverged", "message": str(err),
                "run_dir": str(rundir.path), "steps": loop.step_index,
                **_best_so_far(loop)}
            rundir.write_result(result)
            if "best_step" in result:
                log(f"the best step before the guard gave up, {result['best_step']}, is kept "
                    "(result.json's best_values); `hyperdiff run --from "
                    f"{shell_path(rundir.path)}` starts a new run at its values")
            close_all(watchers, failed=True)  # MLflow marks its run failed (then all close)
            raise
        finally:  # also after any other error (a callback's, a lost rank's)
            close_all(watchers)
        if saved[0] != loop.step_index:  # the last step's own checkpoint holds the same state
            save(loop)
        try:
            result = final_report(task, plan.summary(task, loop, outcome, config), config,
                                  progress=bar.report_phase() if bar is not None else None,
                                  spread=RankSpreader(group) if isinstance(group, Group)
                                  else LocalSpreader())
        except HyperdiffError as err:  # the task's metrics or summary: the steps are saved
            raise HyperdiffError(
                f"{err}; the run's {loop.step_index} outer steps are saved in {rundir.path}: "
                f"fix the task, then `hyperdiff run --resume {shell_path(rundir.path)} "
                f"{ACCEPT_FLAG}` writes the report") from err
    result["run_dir"] = str(rundir.path)
    changed = input_change_warnings(rundir)
    moving = (_still_moving(loop, config, rundir.path) if config.outer.mode == "offline"
              else None)
    if moving:
        log(moving)
    extensions = rundir.extensions()
    if extensions:
        result["extensions"] = extensions
    if changed or moving:
        result["warnings"] = [*result.get("warnings", []), *changed, *([moving] if moving else [])]
    rundir.write_result(result)
    report_all(watchers, result)  # the final metrics, to the loggers that show them
    if _logging(config):  # a resume of the finished run need not hand them the report again
        result[LOGS_COMPLETE] = True
        rundir.write_result(result)
    return result


LOGS_COMPLETE = "logs_complete"  # result.json: the [log] loggers took the report


def _logging(config: Config) -> bool:
    """Whether the run's ``[log]`` section names a logger."""
    logs = config.log
    return bool(logs.csv or logs.tensorboard or getattr(logs, "mlflow", ""))


def _still_moving(driver: Any, config: Config, path: Path) -> str | None:
    """:func:`~hyperdiff.tuner.budget.still_moving` on an offline run's history, with the
    remedy (extending its budget), or ``None``; only for a run that ended on its step budget
    (after early stopping or convergence more steps would not help, and the extension the
    warning suggests is refused)."""
    if not str(driver.stop_reason() or "").startswith("budget:"):
        return None
    # the gradient phase's steps only: a global phase's points are not moves of the values
    first = getattr(driver.plan, "gradient_start", 0)
    moving = still_moving([r for r in driver.history if r.step >= first],
                          label="gradient-phase steps" if first else "outer steps")
    if moving is None:
        return None
    return (f"{moving}; give it more steps with `hyperdiff run --resume {shell_path(path)} --set "
            f"stop.max_steps={2 * config.stop.max_steps}`")


def _progress(extra: Callable[[str], None] | None) -> Callable[[str], None]:
    """``log(message)``: INFO on the ``hyperdiff.experiment`` logger, or ``extra``."""

    def log(message: str) -> None:
        if extra is None:
            _LOG.info(message)
        else:
            extra(message)

    return log


def final_report(task: Task, summary: Summary, config: Config, *,
                 progress: Callable[[], None] | None = None,
                 spread: Spreader | None = None) -> dict[str, Any]:
    """Retrain at the initial and the tuned hyperparameters (``config.report.seeds`` fresh
    seeds each, the same for both, ``summary.segments`` x ``inner.steps`` steps) and evaluate
    every split; ``summary`` (a :class:`~hyperdiff.app.plans.Summary`) adds the mode's own
    entries; ``progress()`` after each training. ``spread`` maps the trainings: under
    torchrun a :class:`~hyperdiff.tuner.distributed.spread.RankSpreader` spreads them over the
    ranks, and every rank gets the one-process report bit for bit."""
    seeds = report_seeds(config.report.seeds)
    report: dict[str, Any] = {
        "task": task.name, "status": "finished", **summary.head, "report_seeds": list(seeds),
        **({"task_params": task.info["params"]} if task.info.get("params") else {}),
        "training_steps": summary.segments * config.inner.steps,
        "sizes": task.info.get("sizes", {}), "cv_folds": config.task.cv_folds, **summary.tail,
    }
    sides = {"initial": task.hparams.raw, "tuned": summary.tuned}
    metrics = task.evaluate_all(list(sides.values()), seeds=seeds, segments=summary.segments,
                                progress=progress, spread=spread)
    for (side, raw), side_metrics in zip(sides.items(), metrics, strict=True):
        report[side] = {
            "hparams": natural_values(task.hparams, raw),
            "summary": task.summarize(task.hparams.natural(raw)) if task.summarize else {},
            "metrics": side_metrics,
        }
    report.update(summary.extra(report, seeds, progress, spread or LocalSpreader()))
    diverged = diverged_retraining(report["initial"]["metrics"], report["tuned"]["metrics"],
                                   config.guard.max_loss_ratio)
    if diverged:
        report["warnings"] = [*report.get("warnings", []), diverged]
    return report


def diverged_retraining(initial: Mapping[str, Mapping[str, float]],
                        tuned: Mapping[str, Mapping[str, float]], ratio: float) -> str | None:
    """The warning for tuned values whose fresh trainings diverge, or ``None``: their loss on
    the selection split (else the validation split) is not finite or is absurd by the guard's
    rule, above ``ratio`` (``guard.max_loss_ratio``) x max(|the initial values' loss|, 1).
    When the initial values' loss is not finite either, the tuned values are not blamed: the
    warning says that the initial values give no finite loss to judge them by.

    >>> diverged_retraining({"val": {"loss": 0.5}}, {"val": {"loss": 4e5}}, 1e6) is None
    True
    >>> diverged_retraining({"val": {"loss": 0.5}}, {"val": {"loss": 2e6}}, 1e6)[:38]
    'the tuned values diverge when trained '
    """
    split = held_out_split(tuned, initial)
    if "loss" not in tuned.get(split, {}) or "loss" not in initial.get(split, {}):
        return None  # a user's metrics may have no loss
    ended, start = tuned[split]["loss"], initial[split]["loss"]
    if not math.isfinite(start):
        return (f"the initial values' {split} loss is {start} when trained fresh on the report "
                f"seeds (tuned values: {ended:.4g}), so the tuned values cannot be judged "
                "against it: check the task's metrics and whether training at the initial "
                "values diverges")
    if math.isfinite(ended) and abs(ended) <= ratio * max(abs(start), 1.0):
        return None
    return (f"the tuned values diverge when trained fresh on the report seeds: {split} loss "
            f"{ended:.3g} against {start:.4g} for the initial values (more than "
            f"guard.max_loss_ratio = {ratio:.3g} x max(|that loss|, 1)): training from the "
            "start at these values is unstable")


RESULT_KEYS = ("task", "status", "stop_reason", "steps", "best_step", "criterion", "time_s",
               "sizes", "initial", "tuned")
SIDE_KEYS = ("hparams", "summary", "metrics")


def result_damage(result: Mapping[str, Any]) -> str | None:
    """What a finished run's ``result.json`` lacks (or holds in another type) that
    :func:`format_table` reads, or ``None`` when it has it all."""
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        return f"it lacks the entries {missing}"
    for side in ("initial", "tuned"):
        value = result[side]
        if not isinstance(value, Mapping) or not all(
                isinstance(value.get(key), Mapping) for key in SIDE_KEYS):
            return f"its {side!r} entry must be an object with the objects {list(SIDE_KEYS)}"
    try:  # every value the table reads, of the type it reads it as
        format_table(result)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        return f"the table cannot be drawn from it: {type(err).__name__}: {err}"
    return None


def format_table(result: Mapping[str, Any]) -> str:
    """The short initial-vs-tuned table that ``hyperdiff run`` prints."""
    initial, tuned = result["initial"], result["tuned"]
    rows: list[tuple[str, str, str]] = []
    discrete = result.get("discrete")
    if discrete:  # the chosen values, not probability summaries
        from hyperdiff.app.discrete_report import choice_rows, gap_lines

        rows.extend(choice_rows(result))
    for name in initial["hparams"]:
        if discrete and name in discrete["choices"]:
            continue
        a, b = initial["hparams"][name], tuned["hparams"][name]
        label = name if not isinstance(a, list) else f"{name} ({len(a)} values)"
        rows.append((label, _summary(a), _summary(b)))
    for key in {**initial["summary"], **tuned["summary"]}:  # a key one side lacks: "-"
        rows.append((f"  {key}", _summary_cell(initial["summary"], key),
                     _summary_cell(tuned["summary"], key)))
    val_label = ("val loss (in the CV pool)" if result.get("cv_folds")
                 else "val loss (hypergradient split)")
    labels = {"val": val_label, "selection": "selection loss",
              "test": "test loss (held out)"}
    own = result.get("online_model") or {}  # an online run: the model it trained itself
    own_cells: dict[str, str] = {}
    for split, label in labels.items():
        if "loss" in initial["metrics"].get(split, {}):  # a user's metrics may have no loss
            rows.append((label, f"{initial['metrics'][split]['loss']:.4f}",
                         f"{tuned['metrics'][split]['loss']:.4f}"))
            if "loss" in own.get(split, {}):
                own_cells[label] = f"{own[split]['loss']:.4f}"
    if held_out := result.get("held_out_tasks"):  # a meta run: adapted on new tasks
        rows.append((f"query loss, {held_out['initial']['tasks']} held-out tasks",
                     f"{held_out['initial']['query_loss']:.4f}",
                     f"{held_out['tuned']['query_loss']:.4f}"))
        if "pretrained" in held_out:  # the baseline: pre-trained on the run's tasks
            rows.append(("  pre-trained on its tasks", "",
                         f"{held_out['pretrained']['query_loss']:.4f}"))
        if "query_accuracy" in held_out["initial"]:  # a classification task
            rows.append(("  query accuracy", f"{held_out['initial']['query_accuracy']:.4f}",
                         f"{held_out['tuned']['query_accuracy']:.4f}"))
            if "pretrained" in held_out:
                rows.append(("  pre-trained: query accuracy", "",
                             f"{held_out['pretrained']['query_accuracy']:.4f}"))
    for key in initial["metrics"]["test"]:  # every other metric of the task, on the test split
        if key != "loss" and key in tuned["metrics"]["test"]:
            label = f"test {key} (held out)"
            rows.append((label, f"{initial['metrics']['test'][key]:.4f}",
                         f"{tuned['metrics']['test'][key]:.4f}"))
            if key in own.get("test", {}):
                own_cells[label] = f"{own['test'][key]:.4f}"
    width = max(len(r[0]) for r in rows) + 2
    col = max(12, *(len(r[1]) for r in rows)) + 2
    own_col = max(12, *(len(r[2]) for r in rows)) + 2 if own_cells else 0

    def line(a: str, b: str, c: str) -> str:
        if not own_cells:
            return f"{a:<{width}}{b:<{col}}{c}"
        return f"{a:<{width}}{b:<{col}}{c:<{own_col}}{own_cells.get(a, '')}".rstrip()

    lines = [
        f"{result['task']}: {result['steps']} outer steps in {result['time_s']:.1f} s "
        f"({result['stop_reason']}); best step {result['best_step']} by "
        f"{result['criterion'].replace('_', ' ')}",
        "",
        f"{'':<{width}}{'initial':<{col}}" + (f"{'tuned':<{own_col}}run's own model"
                                               if own_cells else "tuned"),
        *(line(a, b, c) for a, b, c in rows),
        *(gap_lines(result) if discrete else []),
        *(f"warning: {warning}" for warning in result.get("warnings", [])),
        "",
        f"test split: {result['sizes'].get('test', '?')} examples never used while tuning; "
        + (f"metrics averaged over {len(result['report_seeds'])} fresh training seeds"
           if len(result["report_seeds"]) != 1 else "metrics of one fresh training seed"),
        *(["run's own model: the model the online run trained, as it ended (one training); "
           "tuned: its final values trained fresh"] if own_cells else []),
        f"run directory: {result['run_dir']}",
    ]
    return "\n".join(lines)


def _summary_cell(summary: Mapping[str, Any], key: str) -> str:
    """A task's summary value ``key`` for the table; ``"-"`` where that side has none."""
    return f"{summary[key]:.3g}" if key in summary else "-"


def _summary(value: float | list[float]) -> str:
    if not isinstance(value, list):
        return f"{value:.4g}"
    low, high = min(value), max(value)
    mean = sum(value) / len(value)
    return f"{mean:.3g}" if low == high else f"{mean:.3g} [{low:.2g}, {high:.2g}]"


__all__ = ["build", "config_differences", "final_report", "format_table", "run_experiment"]


