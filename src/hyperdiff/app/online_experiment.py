"""``hyperdiff run`` with ``[outer] mode = "online"``: one training run that tunes itself.

The task's first inner problem is trained once for ``inner.steps`` steps by
:class:`~hyperdiff.tuner.online.OnlineTuner` (window ``outer.window``, method ``method.name``
among reverse / forward / implicit / curvature), with a record appended to the run directory's
history and a checkpoint written every ``output.checkpoint_every`` hyper-steps, so that
``--resume``
continues exactly. The report then trains fresh ``inner.steps``-step runs at the initial and at
the final hyperparameters (``report.seeds`` seeds, the same as offline mode) and evaluates every
split, the held-out test split included; the model trained during the online run itself is
reported as well (``online_model``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hyperdiff.app.config import Config
from hyperdiff.app.loggers import close_all, config_loggers, start_all
from hyperdiff.app.run_inputs import input_change_warnings, restore_or_start
from hyperdiff.app.rundir import RunDir
from hyperdiff.app.tasks import Task, build_task
from hyperdiff.engine.device import resolve_device, task_to_device
from hyperdiff.errors import HyperdiffError, NonFiniteError
from hyperdiff.seeds import report_seeds
from hyperdiff.tuner.history import StepRecord, natural_values
from hyperdiff.tuner.online import METHODS, OnlineTuner

OPTIONS = {"reverse": (), "forward": ("engine",), "implicit": ("solver",),
           "curvature": ("horizon", "horizon_unit", "curvature_scale")}


def build_online(config: Config) -> tuple[Task, OnlineTuner]:
    """The task and the online tuner that ``config`` describes."""
    method = config.method.name
    if method not in METHODS:
        raise HyperdiffError(f"config: method.name must be one of {list(METHODS)} with "
                             f"outer.mode = 'online' (got {method!r})")
    unused = sorted(set(config.method.options) - set(OPTIONS.get(method, ())))
    if unused:
        raise HyperdiffError(f"config: method.{unused[0]} is not used by online {method}; "
                             f"it accepts {list(OPTIONS.get(method, ())) or 'no options'}")
    if config.outer.backprop and method != "reverse":
        raise HyperdiffError(f"config: outer.backprop is used by method.name = 'reverse' only "
                             f"(got {config.outer.backprop} with {method!r}); set it to 0")
    if config.task.cv_folds:
        raise HyperdiffError("config: task.cv_folds must be 0 with outer.mode = 'online' "
                             f"(one training run; got {config.task.cv_folds})")
    task = build_task(
        config.task.name, steps=config.inner.steps,
        selection_fraction=config.task.selection_fraction, cv_folds=0,
        data_seed=config.task.data_seed,
    )
    task = task_to_device(task, resolve_device(config.run.device, "config", "run.device"))
    outer = config.outer
    tuner = OnlineTuner(
        task.problems[0], window=outer.window, method=method, optimizer=outer.optimizer,
        lr=outer.lr, schedule=outer.schedule, clip=outer.clip or None,
        val_batch_size=outer.val_batch or None, selection=task.selection,
        seed=outer.seed, backprop=(outer.backprop or None) if method == "reverse" else None,
        shrink=config.guard.shrink, max_failures=config.guard.max_failures,
        max_loss_ratio=config.guard.max_loss_ratio, normalize=outer.normalize,
        hot_start=None if outer.hot_start == "auto" else outer.hot_start,
        **config.method.options,
    )
    return task, tuner


def run_online(config: Config, rundir: RunDir, *, resume: bool, progress: bool | None,
               log: Callable[[str], None], callbacks: Sequence[Callable[..., Any]] = (),
               accept_changed_inputs: bool = False) -> dict[str, Any]:
    """Run (or resume) an online tuning job in ``rundir``; return the result it writes.
    ``callbacks(tuner, record)`` run after each window, after the loggers of ``[log]``;
    ``accept_changed_inputs``: see :func:`~hyperdiff.app.experiment.run_experiment`."""
    task, tuner = build_online(config)
    if restore_or_start(rundir, config, task.hparams, tuner, resume=resume,
                        accept_changed_inputs=accept_changed_inputs):
        log(f"resuming {rundir.path} at inner step {tuner.inner_step}")
    log(f"tuning {task.name} online: {task.hparams.numel} hyperparameters, one run of "
        f"{config.inner.steps} steps, a {tuner.method} hypergradient every {tuner.window} "
        f"steps; run directory {rundir.path}")

    def on_step(opt: OnlineTuner, record: StepRecord) -> None:
        rundir.append(record)
        if record.status == "failed":
            log(f"guard: {record.message}")
        if opt.hyper_step % config.output.checkpoint_every == 0 or opt.done:
            rundir.save_checkpoint(opt.state_dict())

    watchers = [*config_loggers(config.log, rundir.path), *callbacks]
    start_all(watchers, list(tuner.history))
    try:
        outcome = tuner.run(callbacks=[on_step, *watchers], progress=progress)
    except KeyboardInterrupt:
        log(f"interrupted at inner step {tuner.inner_step}; continue with "
            f"`hyperdiff run --resume {rundir.path}`")
        raise
    except NonFiniteError as err:
        result: dict[str, Any] = {"task": task.name, "status": "diverged",
                                  "message": str(err), "run_dir": str(rundir.path),
                                  "steps": tuner.hyper_step}
        rundir.write_result(result)
        raise
    finally:
        close_all(watchers)
    result = online_report(task, tuner, config)
    result["time_s"] = outcome.time_s
    result["run_dir"] = str(rundir.path)
    result["warnings"] = [*result["warnings"], *input_change_warnings(rundir)]
    rundir.write_result(result)
    return result


def online_report(task: Task, tuner: OnlineTuner, config: Config) -> dict[str, Any]:
    """Fresh full-length trainings at the initial and the final values, and the metrics of the
    model trained during the online run (same layout as the offline report)."""
    seeds = report_seeds(config.report.seeds)
    final = tuner.raw
    report: dict[str, Any] = {
        "task": task.name, "status": "finished", "mode": "online",
        "stop_reason": f"one run of {tuner.inner_step} inner steps",
        "steps": tuner.hyper_step, "best_step": tuner.hyper_step - 1,
        "criterion": "final values", "report_seeds": list(seeds),
        "training_steps": config.inner.steps, "sizes": task.info.get("sizes", {}),
        "cv_folds": 0, "window": tuner.window, "method": tuner.method,
    }
    for side, raw in {"initial": task.hparams.raw, "tuned": final}.items():
        report[side] = {
            "hparams": natural_values(task.hparams, raw),
            "summary": task.summarize(task.hparams.natural(raw)) if task.summarize else {},
            "metrics": task.evaluate(raw, seeds=seeds),
        }
    hview = task.hparams.view(tuner.problem.raw_tensors(final))
    report["online_model"] = task.metrics_at(tuner.state.params, tuner.state.buffers, hview)
    report["warnings"] = list(tuner.warnings)
    return report


__all__ = ["build_online", "online_report", "run_online"]
