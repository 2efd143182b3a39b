"""The run modes of ``hyperdiff run``: one :class:`Plan` per ``outer.mode``, in :data:`PLANS`.

A plan builds the mode's outer loop and reads it (how far it is, when it is done, which rows
its report adds); the runner (:func:`~hyperdiff.app.experiment.run_experiment`) does the rest
the same way for every mode: run directory and lock, inputs, loggers, checkpoints, report.

- ``offline``: :class:`~hyperdiff.tuner.driver.HyperOptimizer` retrains ``inner.steps`` steps
  per outer step; the report retrains at the best step's values.
- ``online``: :class:`~hyperdiff.tuner.online.OnlineTuner` trains the task's first inner problem
  once for ``inner.steps`` steps and takes an outer step every ``outer.window`` steps; the
  report retrains at the final values and also evaluates the model trained during the run
  (``online_model``).

A new mode is one more entry of :data:`PLANS` (and its choice in ``outer.mode``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor

from hyperdiff.app.config import Config
from hyperdiff.app.discrete_report import final_report as discrete_report
from hyperdiff.app.discrete_report import has_relaxation
from hyperdiff.app.loggers import Progress
from hyperdiff.app.run_inputs import starting_at
from hyperdiff.app.tasks import Task, build_task
from hyperdiff.engine.device import resolve_device, task_to_device
from hyperdiff.errors import HyperdiffError
from hyperdiff.hparams.discrete import discrete_names
from hyperdiff.methods.registry import make_method
from hyperdiff.tuner.distributed import data_parallel
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.history import StepRecord
from hyperdiff.tuner.online import METHODS, OnlineTuner
from hyperdiff.tuner.outer_steps import DEFAULT_OFFLINE

OPTIONS = {"reverse": (), "forward": ("engine",), "implicit": ("solver",),
           "curvature": ("horizon", "horizon_unit", "curvature_scale")}


class Summary(NamedTuple):
    """A mode's own parts of the final report, in the order ``result.json`` lists them."""

    head: dict[str, Any]  # after "status": stop reason, steps, best step, criterion, ...
    tail: dict[str, Any]  # after "cv_folds"
    tuned: dict[str, Tensor]  # the raw values reported as "tuned"
    segments: int  # each report training is segments x inner.steps steps
    # (report, seeds, progress) -> the entries after "initial" and "tuned"
    extra: Callable[[dict[str, Any], tuple[int, ...], Callable[[], None] | None], dict[str, Any]]


class Plan(NamedTuple):
    """What one ``outer.mode`` contributes to a run; ``loop`` is the outer loop it builds."""

    # (config) or (config, start): the task and the outer loop, at --from's values ``start``
    build: Callable[..., tuple[Task, Any]]
    check: Callable[[Config, Any], None]  # refuse what the mode cannot run (torchrun group)
    describe: Callable[[Task, Any, Config], str]  # the "tuning ..." log line
    where: Callable[[Any], str]  # how far the loop is: "outer step 3"
    steps: Callable[[Any], int]  # outer steps recorded so far
    done: Callable[[Any], bool]  # finished: checkpoint now
    failed: Callable[[StepRecord], bool]  # a record the log reports as "guard: ..."
    bar: Callable[[Task, Any, Config, bool | None], Progress | None]  # None: loop's own
    summary: Callable[[Task, Any, Any, Config], Summary]  # (task, loop, outcome, config)
    checkpoint_at_end: bool  # checkpoint after the run and on divergence too


def _task(config: Config, cv_folds: int) -> Task:
    """The configured task, on the configured device."""
    task = build_task(
        config.task.name, steps=config.inner.steps,
        selection_fraction=config.task.selection_fraction, cv_folds=cv_folds,
        data_seed=config.task.data_seed,
    )
    return task_to_device(task, resolve_device(config.run.device, "config", "run.device"))


def outer_optimizer_name(config: Config) -> str:
    """``outer.optimizer`` with ``"auto"`` resolved: the measured offline default
    (:data:`~hyperdiff.tuner.outer_steps.DEFAULT_OFFLINE`) offline, Adam online (the
    optimizers of :mod:`hyperdiff.tuner.outer_steps` are offline only)."""
    name = config.outer.optimizer
    if name != "auto":
        return name
    return DEFAULT_OFFLINE if config.outer.mode == "offline" else "adam"


# ------------------------------------------------------------------------------------ offline
def build(config: Config, start: dict[str, Any] | None = None
          ) -> tuple[Task, HyperOptimizer]:
    """The task and the driver that ``config`` describes, starting at ``start``'s raw values
    (``--from``, see :func:`~hyperdiff.app.run_inputs.tuned_values`) if given."""
    task = _task(config, config.task.cv_folds)
    if start is not None:
        task = starting_at(task, start)
    stop = config.stop
    method = make_method(config.method.name, **config.method.options)
    driver = HyperOptimizer(
        list(task.problems),
        method=data_parallel(method) if config.distributed.data_parallel else method,
        optimizer=outer_optimizer_name(config), lr=config.outer.lr,
        clip=config.outer.clip or None, schedule=config.outer.schedule,
        samples="auto" if config.outer.auto_samples else config.outer.samples,
        max_samples=config.outer.max_samples, tie_steps=config.outer.tie_steps,
        warm_start=config.inner.warm_start,
        selection=task.selection, seed=config.outer.seed,
        stopping=Stopping(
            max_steps=stop.max_steps, max_time_s=stop.max_time_s or None,
            patience=stop.patience or None, min_delta=stop.min_delta, grad_tol=stop.grad_tol,
            step_tol=stop.step_tol,
        ),
        shrink=config.guard.shrink, max_failures=config.guard.max_failures,
        max_loss_ratio=config.guard.max_loss_ratio,
    )
    return task, driver


def _trainings_text(folds: int, config: Config) -> str:
    """Trainings per outer step: ``"2"``, or ``"4-32 (auto)"`` with ``outer.auto_samples``."""
    if config.outer.auto_samples:
        return f"{2 * folds}-{config.outer.max_samples * folds} (auto)"
    return str(folds * config.outer.samples)


def _describe_offline(task: Task, driver: HyperOptimizer, config: Config) -> str:
    return (f"tuning {task.name}: {task.hparams.numel} hyperparameters, "
            f"{_trainings_text(len(task.problems), config)} training(s) of "
            f"{config.inner.steps} steps per outer step")


def _offline_bar(task: Task, driver: HyperOptimizer, config: Config,
                 enabled: bool | None) -> Progress:
    """One bar over the outer steps' trainings and the final report's."""
    per_step = len(task.problems) * (driver.auto.minimum if driver.auto else driver.samples)
    return Progress(steps=config.stop.max_steps, done=driver.step_index,
                    units_per_step=per_step, trainings=driver.trainings,
                    report_trainings=(2 + has_relaxation(task.hparams)) * config.report.seeds,
                    enabled=enabled, desc=task.name)


def _offline_summary(task: Task, driver: HyperOptimizer, outcome: Any,
                     config: Config) -> Summary:
    """Retrain at the best step's values (from theta_0 for as many segments as the warm
    start had trained by then); a discrete task adds its argmax choices."""
    segments = outcome.best_step + 1 if config.inner.warm_start else 1
    head = {"stop_reason": outcome.stop_reason, "steps": outcome.steps,
            "best_step": outcome.best_step, "criterion": outcome.criterion,
            "time_s": driver.elapsed}

    def extra(report: dict[str, Any], seeds: tuple[int, ...],
              progress: Callable[[], None] | None) -> dict[str, Any]:
        if not discrete_names(task.hparams):
            return {}
        return {"discrete": discrete_report(task, outcome, report, seeds=seeds,
                                            segments=segments, progress=progress)}

    return Summary(head, {}, outcome.best_raw, segments, extra)


def _no_check(config: Config, group: Any) -> None:
    """Offline runs under torchrun too (the trainings of a step are spread over ranks)."""


# ------------------------------------------------------------------------------------- online
def build_online(config: Config, start: dict[str, Any] | None = None
                 ) -> tuple[Task, OnlineTuner]:
    """The task and the online tuner that ``config`` describes (``start``: refused)."""
    if start is not None:
        raise HyperdiffError(f"run: --from is for outer.mode = 'offline' runs only (got "
                             f"{config.outer.mode!r}); set the online run's initial values "
                             "in its task")
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
    task = _task(config, 0)
    outer = config.outer
    tuner = OnlineTuner(
        task.problems[0], window=outer.window, method=method,
        optimizer=outer_optimizer_name(config),
        lr=outer.lr, schedule=outer.schedule, clip=outer.clip or None,
        val_batch_size=outer.val_batch or None, selection=task.selection,
        seed=outer.seed, backprop=(outer.backprop or None) if method == "reverse" else None,
        shrink=config.guard.shrink, max_failures=config.guard.max_failures,
        max_loss_ratio=config.guard.max_loss_ratio, normalize=outer.normalize,
        hot_start=None if outer.hot_start == "auto" else outer.hot_start,
        **config.method.options,
    )
    return task, tuner


def _one_process(config: Config, group: Any) -> None:
    if group is not None:
        raise HyperdiffError(
            "run: outer.mode = 'online' is one training run in one process; under torchrun "
            f"each of the {group.world} ranks would repeat it. Launch it with plain "
            "`hyperdiff run`, or use outer.mode = 'offline' to spread trainings over ranks")


def _describe_online(task: Task, tuner: OnlineTuner, config: Config) -> str:
    return (f"tuning {task.name} online: {task.hparams.numel} hyperparameters, one run of "
            f"{config.inner.steps} steps, a {tuner.method} hypergradient every "
            f"{tuner.window} steps")


def _online_summary(task: Task, tuner: OnlineTuner, outcome: Any, config: Config) -> Summary:
    """Retrain at the final values; also the metrics of the model the run itself trained."""
    head = {"mode": "online", "stop_reason": f"one run of {tuner.inner_step} inner steps",
            "steps": tuner.hyper_step, "best_step": tuner.hyper_step - 1,
            "criterion": "final values"}
    tail = {"window": tuner.window, "method": tuner.method}
    final = tuner.raw

    def extra(report: dict[str, Any], seeds: tuple[int, ...],
              progress: Callable[[], None] | None) -> dict[str, Any]:
        hview = task.hparams.view(tuner.problem.raw_tensors(final))
        return {"online_model": task.metrics_at(tuner.state.params, tuner.state.buffers, hview),
                "warnings": list(tuner.warnings), "time_s": outcome.time_s}

    return Summary(head, tail, final, 1, extra)


PLANS: dict[str, Plan] = {
    "offline": Plan(
        build=build, check=_no_check, describe=_describe_offline,
        where=lambda driver: f"outer step {driver.step_index}",
        steps=lambda driver: driver.step_index, done=lambda driver: bool(driver.stop_reason()),
        failed=lambda record: bool(record.message), bar=_offline_bar,
        summary=_offline_summary, checkpoint_at_end=True),
    "online": Plan(
        build=build_online, check=_one_process, describe=_describe_online,
        where=lambda tuner: f"inner step {tuner.inner_step}",
        steps=lambda tuner: tuner.hyper_step, done=lambda tuner: tuner.done,
        failed=lambda record: record.status == "failed", bar=lambda *_: None,
        summary=_online_summary, checkpoint_at_end=False),
}

__all__ = ["PLANS", "Plan", "Summary", "build", "build_online"]
