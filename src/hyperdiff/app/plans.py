"""The run modes of ``hyperdiff run``: one :class:`Plan` per ``outer.mode``, in :data:`PLANS`.

A mode builds the one outer loop (:class:`~hyperdiff.tuner.driver.HyperOptimizer`) with its
plan and adds its own report rows; the runner (:func:`~hyperdiff.app.experiment.run_experiment`)
does the rest the same way for every mode, reading the loop the same way (``loop.where()``,
``loop.step_index``, ``loop.done``): run directory and lock, inputs, loggers, checkpoints,
report.

- ``offline``: the :class:`~hyperdiff.tuner.offline_plan.OfflinePlan` retrains ``inner.steps``
  steps per outer step; the report retrains at the best step's values.
- ``online``: the :class:`~hyperdiff.tuner.online_plan.OnlinePlan` trains the task's first
  inner problem once for ``inner.steps`` steps and takes an outer step every ``outer.window``
  steps; the report retrains at the final values and also evaluates the model trained during
  the run (``online_model``).
- ``meta``: the :class:`~hyperdiff.tuner.meta_plan.MetaPlan` adapts on ``outer.meta_batch``
  new tasks of the task's distribution per outer step; the report adds the post-adaptation
  query loss on ``outer.meta_test_tasks`` held-out tasks (``held_out_tasks``).

A new mode is one more entry of :data:`PLANS` (and its choice in ``outer.mode``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor

from hyperdiff.app.config import ONLINE_BETAS, ONLINE_SCHEDULE_OVER, Config, OuterConfig
from hyperdiff.app.discrete_report import final_report as discrete_report
from hyperdiff.app.discrete_report import has_relaxation, online_choices, relaxed
from hyperdiff.app.loggers import Progress
from hyperdiff.app.meta_report import held_out_report, pretrained_start
from hyperdiff.app.run_inputs import starting_at
from hyperdiff.app.tasks import Task, build_task
from hyperdiff.engine.data import Minibatches
from hyperdiff.engine.device import OnDevice, resolve_device, task_to_device
from hyperdiff.errors import HyperdiffError
from hyperdiff.hparams.discrete import discrete_names
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.methods.base import Method
from hyperdiff.methods.registry import (
    capabilities,
    make_method,
    methods_where,
    registered_constructor,
)
from hyperdiff.tuner.distributed import data_parallel
from hyperdiff.tuner.distributed.spread import Spreader
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.meta_plan import MetaPlan
from hyperdiff.tuner.offline_plan import OfflinePlan
from hyperdiff.tuner.online_plan import ADAM_FAMILY, OnlinePlan
from hyperdiff.tuner.online_rescue import lr_name
from hyperdiff.tuner.outer_steps import default_schedule


class Summary(NamedTuple):
    """A mode's own parts of the final report, in the order ``result.json`` lists them."""

    head: dict[str, Any]  # after "status": stop reason, steps, best step, criterion, ...
    tail: dict[str, Any]  # after "cv_folds"
    tuned: dict[str, Tensor]  # the raw values reported as "tuned"
    segments: int  # each report training is segments x inner.steps steps
    # (report, seeds, progress, spread) -> the entries after "initial" and "tuned"; ``spread``
    # maps any trainings they need over the ranks (as the report's own)
    extra: Callable[[dict[str, Any], tuple[int, ...], Callable[[], None] | None, Spreader],
                    dict[str, Any]]


class Plan(NamedTuple):
    """What one ``outer.mode`` contributes to a run: the :class:`HyperOptimizer` with its
    plan, and the few readings that differ (log line, progress bar, report rows)."""

    # (config) or (config, start), keyword ``stored``: the task and the outer loop, at --from's
    # values ``start``; ``stored=True``: config is a run directory's own (a resume), whose keys
    # the code that wrote it did not read are passed at their defaults, not refused
    build: Callable[..., tuple[Task, HyperOptimizer]]
    check: Callable[[Config, Any], None]  # refuse what the mode cannot run (torchrun group)
    describe: Callable[[Task, HyperOptimizer, Config], str]  # the "tuning ..." log line
    bar: Callable[[Task, HyperOptimizer, Config, bool | None], Progress | None]  # None: loop's
    summary: Callable[[Task, HyperOptimizer, Any, Config], Summary]  # (task, loop, outcome, ..)


def _task(config: Config, cv_folds: int) -> Task:
    """The configured task, on the configured device."""
    task = build_task(
        config.task.name, steps=config.inner.steps,
        selection_fraction=config.task.selection_fraction, cv_folds=cv_folds,
        data_seed=config.task.data_seed, params=config.task.params,
    )
    return task_to_device(task, resolve_device(config.run.device, "config", "run.device"))


def outer_optimizer_name(config: Config) -> str:
    """``outer.optimizer`` with ``"auto"`` resolved: the ``default_optimizer`` of the plan that
    ``outer.mode`` runs (offline the measured ``signstep``, online and meta Adam)."""
    name = config.outer.optimizer
    if name != "auto":
        return name
    defaults = {"offline": OfflinePlan.default_optimizer,
                "online": OnlinePlan.default_optimizer, "meta": MetaPlan.default_optimizer}
    return defaults[config.outer.mode]


def configured_method(config: Config) -> Method:
    """The method of ``config``'s ``[method]``, one path for both modes: the registered
    constructor of ``method.name`` called with its options (``hd.implicit(solver="cg")`` is the
    same method offline and online); online, ``outer.backprop = k`` is ``truncated(k)``; with
    ``distributed.data_parallel``, wrapped by :func:`~hyperdiff.tuner.distributed.data_parallel`
    (each rank trains on its shard of every batch)."""
    try:
        if config.outer.mode == "online":
            name, options = _online_method(config)
            method = registered_constructor(name)(**options)
        else:
            method = make_method(config.method.name, **config.method.options)
    except HyperdiffError as err:
        if str(err).startswith("config:"):
            raise
        raise HyperdiffError(f"config: [method] (method.name = {config.method.name!r}, its "
                             f"options method.NAME = VALUE): {err}") from None
    return data_parallel(method) if config.distributed.data_parallel else method


def _online_method(config: Config) -> tuple[str, dict[str, Any]]:
    """The registered name and options of the online method ``config`` asks for: a method
    whose capabilities say ``online``, with only the options its segment reads."""
    name, options = config.method.name, config.method.options
    names = methods_where(online=True)
    if name not in names:
        raise HyperdiffError(f"config: method.name must be one of {names} with "
                             f"outer.mode = 'online' (got {name!r})")
    accepted = list(capabilities(name).segment_options)
    unused = sorted(set(options) - set(accepted))
    if unused:
        raise HyperdiffError(f"config: method.{unused[0]} is not used by online {name}; "
                             f"it accepts {accepted or 'no options'}")
    if config.outer.backprop and name != "reverse":
        raise HyperdiffError(f"config: outer.backprop is used by method.name = 'reverse' only "
                             f"(got {config.outer.backprop} with {name!r}, the online default "
                             "when method.name is not set); set it to 0, or set "
                             "method.name = 'reverse'")
    if config.outer.backprop:
        return "truncated", {"k": config.outer.backprop}
    return name, dict(options)


# ------------------------------------------------------------------------------------ offline
def build(config: Config, start: dict[str, Any] | None = None, *, stored: bool = False
          ) -> tuple[Task, HyperOptimizer]:
    """The task and the driver that ``config`` describes, starting at ``start``'s raw values
    (``--from``, see :func:`~hyperdiff.app.run_inputs.tuned_values`) if given (``stored``:
    :class:`Plan`)."""
    task = _task(config, config.task.cv_folds)
    if start is not None:
        task = starting_at(task, start)
    max_samples = (config.outer.max_samples if config.outer.auto_samples or not stored
                   else OuterConfig().max_samples)  # unread then: a stored run ran without it
    # a stored warm-start run's phase options: its checkpoint says whether a phase ran, which
    # OfflinePlan.load_state_dict refuses; one that did not ran as the run without them
    unexplored = stored and config.inner.warm_start
    plan = OfflinePlan(samples="auto" if config.outer.auto_samples else config.outer.samples,
                       max_samples=max_samples, warm_start=config.inner.warm_start,
                       explore=0 if unexplored else config.outer.explore,
                       explore_decades=(OuterConfig().explore_decades if unexplored
                                        else config.outer.explore_decades),
                       explore_when=(OuterConfig().explore_when if unexplored
                                     else config.outer.explore_when),
                       confirm=config.outer.confirm,
                       confirm_chaotic=config.outer.confirm_chaotic,
                       revert=config.outer.revert, common_seed=config.outer.common_seed)
    return task, _outer_loop(config, list(task.problems), plan, task.selection)


def _outer_loop(config: Config, problems: list[Any], plan: Any,
                selection: list[Any] | None, *, unranked: bool = False) -> HyperOptimizer:
    """The :class:`HyperOptimizer` of an offline or meta run with ``plan`` (``unranked``: a
    stored meta run without validation tasks, whose ``stop.patience`` nothing read)."""
    stop = config.stop
    return HyperOptimizer(
        problems, plan=plan, method=configured_method(config),
        optimizer=outer_optimizer_name(config), lr=config.outer.lr,
        clip=config.outer.clip or None, schedule=config.outer.schedule,
        tie_steps=config.outer.tie_steps,
        selection=selection, seed=config.outer.seed,
        stopping=Stopping(
            max_steps=stop.max_steps, max_time_s=stop.max_time_s or None,
            patience=None if unranked else stop.patience or None, min_delta=stop.min_delta,
            grad_tol=stop.grad_tol,
            step_tol=stop.step_tol, travel=stop.travel, extend=stop.extend,
            chaos_ratio=stop.chaos_ratio or None,
        ),
        shrink=config.guard.shrink, max_failures=config.guard.max_failures,
        max_loss_ratio=config.guard.max_loss_ratio,
    )


def _trainings_text(folds: int, config: Config) -> str:
    """Trainings per outer step: ``"2"``, or ``"4-32 (auto)"`` with ``outer.auto_samples``."""
    if config.outer.auto_samples:
        return f"{2 * folds}-{config.outer.max_samples * folds} (auto)"
    return str(folds * config.outer.samples)


def _describe_offline(task: Task, driver: HyperOptimizer, config: Config) -> str:
    return (f"tuning {task.name}: {task.hparams.numel} hyperparameters, "
            f"{_trainings_text(len(task.problems), config)} training(s) of "
            f"{config.inner.steps} steps per outer step")


def offline_bar(task: Task, driver: HyperOptimizer, config: Config, enabled: bool | None,
                report_trainings: int | None = None) -> Progress:
    """One bar over the outer steps' trainings (the steps to come at the fewest trainings
    each) and the final report's (``report_trainings``, default the run's report)."""
    plan = driver.plan
    assert isinstance(plan, OfflinePlan)
    per_step = len(task.problems) * (plan.auto.minimum if plan.auto else plan.samples)
    report = (2 + has_relaxation(task.hparams)) * config.report.seeds
    return Progress(total=driver.trainings
                    + (config.stop.max_steps - driver.step_index) * per_step,
                    initial=driver.trainings, enabled=enabled, desc=task.name,
                    report_trainings=report if report_trainings is None else report_trainings)


def _offline_summary(task: Task, driver: HyperOptimizer, outcome: Any,
                     config: Config) -> Summary:
    """Retrain at the best step's values (from theta_0 for as many segments as the warm
    start had trained by then); a discrete task adds its argmax choices."""
    segments = outcome.best_step + 1 if config.inner.warm_start else 1
    head = {"stop_reason": outcome.stop_reason, "steps": outcome.steps,
            "best_step": outcome.best_step, "criterion": outcome.criterion,
            "time_s": driver.elapsed}

    def extra(report: dict[str, Any], seeds: tuple[int, ...],
              progress: Callable[[], None] | None, spread: Spreader) -> dict[str, Any]:
        if not discrete_names(task.hparams):
            return {}
        return {"discrete": discrete_report(task, outcome, report, seeds=seeds,
                                            segments=segments, progress=progress,
                                            spread=spread)}

    return Summary(head, {}, outcome.best_raw, segments, extra)


def _no_check(config: Config, group: Any) -> None:
    """Offline runs under torchrun too (the trainings of a step are spread over ranks)."""


# ------------------------------------------------------------------------------------- online
def build_online(config: Config, start: dict[str, Any] | None = None, *, stored: bool = False
                 ) -> tuple[Task, HyperOptimizer]:
    """The task and the online loop that ``config`` describes (``start``: refused;
    ``stored``: :class:`Plan`)."""
    if start is not None:
        raise HyperdiffError(f"run: --from is for outer.mode = 'offline' runs only (got "
                             f"{config.outer.mode!r}); set the online run's initial values "
                             "in its task")
    _online_method(config)  # refused before the task is built
    if config.task.cv_folds:
        raise HyperdiffError("config: task.cv_folds must be 0 with outer.mode = 'online' "
                             "(one training run; cross-validation folds are offline only, "
                             "outer.samples draws validation samples per window; got "
                             f"{config.task.cv_folds})")
    _offline_only_explore(config)
    if config.outer.auto_samples:
        raise HyperdiffError("config: outer.auto_samples must be false with outer.mode = "
                             "'online' (a window draws a fixed outer.samples validation "
                             "samples; got true)")
    task = _task(config, 0)
    outer = config.outer
    problem = task.problems[0]
    optimizer = outer_optimizer_name(config)
    _read_online_outer_keys(config, optimizer, stored)
    if not stored and outer.seed != OuterConfig().seed and not outer.val_batch and not \
            discrete_names(task.hparams):
        raise HyperdiffError(
            f"config: outer.seed must be left at its default {OuterConfig().seed} with "
            f"outer.mode = 'online', outer.val_batch = 0 and no discrete hyperparameters (it "
            f"seeds the validation draws and the choices' draws, and this run has neither; "
            f"outer.train_seed seeds the one training; got {outer.seed})")
    plan = OnlinePlan(window=outer.window, val_batch_size=outer.val_batch or None,
                      growth=outer.window_growth,
                      hot_start=None if outer.hot_start == "auto" else outer.hot_start,
                      samples=outer.samples, **_start_tries(outer, problem),
                      settle=outer.settle,
                      settle_tol=outer.settle_tol, schedule_over=outer.schedule_over,
                      lowering=outer.lowering,
                      betas=(outer.beta1, outer.beta2) if optimizer in ADAM_FAMILY else None,
                      train_seed=None if outer.train_seed < 0 else outer.train_seed)
    loop = HyperOptimizer(
        problem, plan=plan, method=configured_method(config), optimizer=optimizer,
        lr=outer.lr, schedule=outer.schedule, clip=outer.clip or None, selection=task.selection,
        seed=outer.seed, shrink=config.guard.shrink, max_failures=config.guard.max_failures,
        max_loss_ratio=config.guard.max_loss_ratio, normalize=outer.normalize,
        tie_steps=outer.tie_steps)
    return task, loop


def _start_tries(outer: OuterConfig, problem: Any) -> dict[str, int]:
    """``outer.rescue`` and ``outer.retry`` for the online plan; at their defaults, 0 where
    the learning rate is not one value to cut (they would not apply, and the plan would say
    so for settings the user never made; a value set off its default is passed and said)."""
    default = OuterConfig()
    if (outer.rescue, outer.retry) == (default.rescue, default.retry) and \
            lr_name(problem) is None:
        return {"rescue": 0, "retry": 0}
    return {"rescue": outer.rescue, "retry": outer.retry}


def _read_online_outer_keys(config: Config, optimizer: str, stored: bool = False) -> None:
    """Refuse ``outer.beta1``/``beta2`` off their online defaults with an outer optimizer
    that has no betas, ``outer.max_samples`` off its default, and ``outer.schedule_over`` off
    its default with a constant outer schedule: nothing would read them (they were stored in
    config.toml and ignored; ``stored``: a run directory's own config, which the code that
    wrote it ran with ``outer.max_samples`` unread, is not refused for it)."""
    outer = config.outer
    betas = (outer.beta1, outer.beta2)
    if optimizer not in ADAM_FAMILY and betas != ONLINE_BETAS:
        raise HyperdiffError(
            f"config: outer.beta1 and outer.beta2 must be left at their defaults "
            f"{ONLINE_BETAS} with outer.optimizer = {optimizer!r} (they are the betas of adam "
            f"and adamw; got {betas})")
    samples_cap = OuterConfig().max_samples
    if outer.max_samples != samples_cap and not stored:  # bounds auto_samples: offline only
        raise HyperdiffError(
            f"config: outer.max_samples must be left at its default {samples_cap} with "
            f"outer.mode = 'online' (it bounds outer.auto_samples, which is offline only; a "
            f"window draws outer.samples validation samples; got {outer.max_samples})")
    schedule = default_schedule(optimizer) if outer.schedule == "auto" else outer.schedule
    if schedule == "constant" and outer.schedule_over != ONLINE_SCHEDULE_OVER:
        raise HyperdiffError(
            f"config: outer.schedule_over must be left at its default "
            f"{ONLINE_SCHEDULE_OVER!r} with a constant outer schedule (it says what the "
            f"cosine runs over; got {outer.schedule_over!r})")


def _online(loop: HyperOptimizer) -> OnlinePlan:
    assert isinstance(loop.plan, OnlinePlan)
    return loop.plan


def _data_parallel_only(config: Config, group: Any) -> None:
    """Under torchrun an online run is data-parallel: every rank trains the same windows on
    its shard of every batch (``distributed.data_parallel = true``); else refused."""
    if group is not None and not config.distributed.data_parallel:
        raise HyperdiffError(
            "run: distributed.data_parallel must be true for outer.mode = 'online' under "
            f"torchrun (got false: each of the {group.world} ranks would repeat the one "
            "training run). Set distributed.data_parallel = true to train every window on "
            "the ranks' shards of each batch, launch it with plain `hyperdiff run`, or use "
            "outer.mode = 'offline' to spread trainings over ranks")


def _describe_online(task: Task, loop: HyperOptimizer, config: Config) -> str:
    plan = _online(loop)
    return (f"tuning {task.name} online: {task.hparams.numel} hyperparameters, one run of "
            f"{config.inner.steps} steps, a {plan.label} hypergradient every "
            f"{plan.window} steps")


def _online_bar(task: Task, loop: HyperOptimizer, config: Config,
                enabled: bool | None) -> Progress:
    """One bar over the run's inner steps and the final report's (2 trainings of the run's
    length per seed), showing each window's loss."""
    plan = _online(loop)
    steps = plan.problem.steps
    return Progress(total=steps, initial=plan.inner_step, unit="step", desc=task.name,
                    report_trainings=2 * config.report.seeds, report_unit=steps,
                    enabled=enabled, position=lambda loop, record: _online(loop).inner_step)


def _online_summary(task: Task, loop: HyperOptimizer, outcome: Any, config: Config
                    ) -> Summary:
    """Retrain at the final values; also the metrics of the model the run itself trained."""
    plan = _online(loop)
    head = {"mode": "online", "stop_reason": f"one run of {plan.inner_step} inner steps",
            "steps": loop.step_index, "best_step": loop.step_index - 1,
            "criterion": "final values"}
    tail = {"window": plan.window, "method": plan.label}
    final = loop.raw

    def extra(report: dict[str, Any], seeds: tuple[int, ...],
              progress: Callable[[], None] | None, spread: Spreader) -> dict[str, Any]:
        hview = _own_model_hparams(task, loop).view(plan.problem.raw_tensors(final))
        own = task.metrics_at(plan.state.params, plan.state.buffers, hview)
        worse = own_model_warning(own, report["initial"]["metrics"])
        chosen = ({"discrete": online_choices(task, final, report)}
                  if discrete_names(task.hparams) else {})
        return {"online_model": own, "warnings": [*plan.warnings, *([worse] if worse else [])],
                "time_s": outcome.time_s, **chosen}

    return Summary(head, tail, final, 1, extra)


def _own_model_hparams(task: Task, loop: HyperOptimizer) -> HyperParameters:
    """The hyperparameters through which the online run's own model is read: a relaxed or
    Gumbel choice as the noise-free mixture at the temperature of the last window that
    trained the model (:func:`~hyperdiff.app.discrete_report.relaxed`, the relaxed model of
    docs/discrete.md), a REINFORCE choice at its argmax; the task's own without discrete
    hyperparameters."""
    if not discrete_names(task.hparams):
        return task.hparams
    last = next((r.discrete for r in reversed(loop.history) if r.status == "ok" and r.discrete),
                None)
    return relaxed(task.hparams, None if last is None else last.get("temperature"))


def held_out_split(*reports: Mapping[str, Any]) -> str:
    """The split on which to compare report columns: the selection split, held out from the
    hypergradients, where every one of ``reports`` (``{split: metrics}``) has it, else the
    validation split."""
    return "selection" if all("selection" in r for r in reports) else "val"


def own_model_warning(own: Mapping[str, Mapping[str, float]],
                      initial: Mapping[str, Mapping[str, float]]) -> str | None:
    """The warning for an online run whose own model ends with a higher loss than the untuned
    start, or ``None``. Compared on the selection split (held out from the hypergradients),
    else on the validation split; ``own`` is the run's model's ``{split: metrics}``,
    ``initial`` the initial values' retrained means (the report's ``initial`` column).

    >>> own_model_warning({"val": {"loss": 0.2}}, {"val": {"loss": 0.3}}) is None
    True
    >>> own_model_warning({"val": {"loss": float("nan")}}, {"val": {"loss": 0.3}})[:46]
    "the run's own model ends worse than the untune"
    """
    split = held_out_split(own, initial)
    ended, start = own[split]["loss"], initial[split]["loss"]
    if math.isfinite(ended) and ended <= start:
        return None
    return (f"the run's own model ends worse than the untuned start on the {split} split "
            f"(loss {ended:.4g} against {start:.4g}, the initial values trained fresh on the "
            "report seeds); the tuned column trains its final values fresh, and a lower "
            "outer.lr moves the values less per window")


# --------------------------------------------------------------------------------------- meta
OFFLINE_ONLY = {"confirm": "the confirmations are",
                "confirm_chaotic": "the confirmations of chaotic steps are",
                "revert": "the return to the best values is",
                "common_seed": "the steps' common seeds are"}
"""Offline plan options an online or meta run refuses unless at their defaults or 0: what each
is."""


def _offline_only_explore(config: Config) -> None:
    """Refuse an ``outer.explore`` or another :data:`OFFLINE_ONLY` key set for an online or
    meta run (the global phase, the confirmations, the return to the best values and the
    common seeds are the offline plan's; the default, a phase after a broken or weak start
    only, does not apply there)."""
    default = OuterConfig()
    for key, what in OFFLINE_ONLY.items():
        value, expected = getattr(config.outer, key), getattr(default, key)
        if value not in (expected, 0):
            allowed = f"{expected} or 0" if expected else f"{expected}"
            raise HyperdiffError(f"config: outer.{key} must be {allowed} with outer.mode = "
                                 f"{config.outer.mode!r} ({what} offline only; got "
                                 f"{value})")
    asked = (config.outer.explore, config.outer.explore_when)
    if config.outer.explore and asked != (default.explore, default.explore_when):
        raise HyperdiffError(f"config: outer.explore must be 0 or its default "
                             f"{default.explore} (outer.explore_when = "
                             f"{default.explore_when!r}) with outer.mode = "
                             f"{config.outer.mode!r} (the global phase is offline only; got "
                             f"{config.outer.explore}, {config.outer.explore_when!r})")


def build_meta(config: Config, start: dict[str, Any] | None = None, *, stored: bool = False
               ) -> tuple[Task, HyperOptimizer]:
    """The task and the meta loop: :class:`~hyperdiff.tuner.meta_plan.MetaPlan` over the
    task's distribution, ``outer.meta_batch`` tasks per outer step, the task's problem as the
    template of every task (no selection split: each step's tasks are new; with
    ``outer.meta_val_tasks`` fixed validation tasks rank the steps; ``stored``: :class:`Plan`)."""
    _offline_only_explore(config)
    if config.task.cv_folds:
        raise HyperdiffError("config: task.cv_folds must be 0 with outer.mode = 'meta' (the "
                             f"tasks take the place of folds; got {config.task.cv_folds})")
    task = _task(config, 0)
    if task.tasks is None:
        raise HyperdiffError(
            f"config: outer.mode must be 'offline' or 'online' for task {task.name!r}, which "
            "has no task distribution (got 'meta'); a meta task passes "
            "hd.task(..., tasks=sample) with sample(index, seed) -> (support, query), or use "
            "the built-in sinusoid_maml")
    if not stored and (size := _minibatch_size(task.problems[0].train_data)) is not None:
        raise HyperdiffError(
            f"config: task {task.name}'s batch_size must be None with outer.mode = 'meta' "
            f"(got {size}: meta-training adapts on each task's support set as the task "
            "distribution's sample(index, seed) returns it; to adapt on minibatches, return "
            f"hd.minibatches(x, y, batch_size={size}) as the support set)")
    if start is not None:
        task = starting_at(task, start)
    plan = MetaPlan(task.tasks, batch=config.outer.meta_batch,
                    validation_tasks=config.outer.meta_val_tasks)
    return task, _outer_loop(config, [task.problems[0]], plan, None,
                             unranked=stored and not config.outer.meta_val_tasks)


def _minibatch_size(source: Any) -> int | None:
    """The batch size of a template trained on minibatches (``hd.task(batch_size=...)``)."""
    while isinstance(source, OnDevice):
        source = source.source
    return source.batch_size if isinstance(source, Minibatches) else None


def _describe_meta(task: Task, loop: HyperOptimizer, config: Config) -> str:
    return (f"tuning {task.name} by meta-learning: {task.hparams.numel} hyperparameters, "
            f"{config.outer.meta_batch} new task(s) of {config.inner.steps} inner steps per "
            "outer step")


def _meta_bar(task: Task, loop: HyperOptimizer, config: Config,
              enabled: bool | None) -> Progress:
    """One bar over the outer steps' trainings (``outer.meta_batch`` each) and the report's."""
    return Progress(total=loop.trainings
                    + (config.stop.max_steps - loop.step_index) * config.outer.meta_batch,
                    initial=loop.trainings, enabled=enabled, desc=task.name,
                    report_trainings=2 * (config.report.seeds + config.outer.meta_test_tasks))


def _meta_summary(task: Task, loop: HyperOptimizer, outcome: Any, config: Config) -> Summary:
    """The offline summary, plus the post-adaptation query loss on held-out tasks at the
    initial and the tuned values (:mod:`hyperdiff.app.meta_report`)."""
    head = {"mode": "meta", "stop_reason": outcome.stop_reason, "steps": outcome.steps,
            "best_step": outcome.best_step, "criterion": outcome.criterion,
            "time_s": loop.elapsed}
    tail = {"meta_batch": config.outer.meta_batch, "method": config.method.name}
    values = {"initial": task.hparams.raw, "tuned": outcome.best_raw}

    def extra(report: dict[str, Any], seeds: tuple[int, ...],
              progress: Callable[[], None] | None, spread: Spreader) -> dict[str, Any]:
        pretrained = pretrained_start(task, task.hparams.raw, steps=outcome.steps,
                                      batch=config.outer.meta_batch, seed=config.outer.seed,
                                      lr=config.outer.lr)
        rows = values if pretrained is None else {**values, "pretrained": pretrained}
        return {"held_out_tasks": held_out_report(task, rows, config.outer.meta_test_tasks,
                                                  spread)}

    return Summary(head, tail, outcome.best_raw, 1, extra)


PLANS: dict[str, Plan] = {
    "offline": Plan(build=build, check=_no_check, describe=_describe_offline, bar=offline_bar,
                    summary=_offline_summary),
    "online": Plan(build=build_online, check=_data_parallel_only, describe=_describe_online,
                   bar=_online_bar, summary=_online_summary),
    "meta": Plan(build=build_meta, check=_no_check, describe=_describe_meta, bar=_meta_bar,
                 summary=_meta_summary),
}

__all__ = ["PLANS", "Plan", "Summary", "build", "build_meta", "build_online",
           "configured_method", "offline_bar"]
