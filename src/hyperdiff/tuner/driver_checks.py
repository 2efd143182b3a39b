"""The argument checks of :class:`~hyperdiff.tuner.driver.HyperOptimizer`, one function each.

Each raises :class:`~hyperdiff.errors.HyperdiffError` naming ``HyperOptimizer``, the argument,
what is valid and what was given: the problems (one, or folds that tune the same
hyperparameters), the selection split (evaluated once at theta_0, so that a batch the loss
cannot take fails at once), the sample count, and a checkpoint to resume from (its step and
history, its trainings per step, its outer optimizer state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from hyperdiff.engine.data import validation_batches
from hyperdiff.engine.datacheck import check_batch, shapes_of
from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import validation_loss
from hyperdiff.errors import HyperdiffError, LossError, Text, fail, positive_int
from hyperdiff.logs import get_logger
from hyperdiff.tuner.global_phase import restarts
from hyperdiff.tuner.history import natural_values
from hyperdiff.tuner.snr import AutoSamples
from hyperdiff.tuner.state_checks import (
    check_count,
    check_guard_state,
    check_like,
    check_optimizer_shapes,
    damaged,
    lacks_setting,
    optimizer_probe_state,
    shape_of,
)
from hyperdiff.typing import Batch
from hyperdiff.wording import option

_LOG = get_logger("driver")  # the driver's warnings, under the driver's logger


def check_problems(problem: Problem | Sequence[Problem]) -> tuple[Problem, ...]:
    """``problem`` as a non-empty tuple of problems that tune the same hyperparameters."""
    valid = "a Problem or a non-empty sequence of Problems (made by hd.make_problem)"
    if hasattr(problem, "problems") and hasattr(problem, "final_problem"):  # a built task
        raise fail("HyperOptimizer", "problem", f"{valid}; for a task pass its problems and "
                   "selection split: HyperOptimizer(list(task.problems), "
                   "selection=task.selection)", Text(f"the task {type(problem).__name__} "
                                                     f"{getattr(problem, 'name', '')!r}"))
    if callable(getattr(problem, "build", None)) and hasattr(problem, "train_loss"):
        raise fail("HyperOptimizer", "problem", f"{valid}; build the task first: task = "
                   "spec.build(), then HyperOptimizer(list(task.problems), "
                   "selection=task.selection)", Text(f"the unbuilt {type(problem).__name__} "
                                                     f"{getattr(problem, 'name', '')!r}"))
    if isinstance(problem, Problem):
        problems: tuple[Any, ...] = (problem,)
    elif isinstance(problem, Iterable) and not isinstance(problem, (str, bytes, Mapping)):
        problems = tuple(problem)
    else:
        problems = ()
    if not problems or not all(isinstance(p, Problem) for p in problems):
        raise fail("HyperOptimizer", "problem", valid, problem)
    first = problems[0].hparams
    names = list(first)
    for k, p in enumerate(problems[1:], start=1):
        if list(p.hparams) != names:
            raise fail("HyperOptimizer", "problems", f"all tuning the hyperparameters {names}",
                       list(p.hparams))
        for name in names:  # one raw vector moves every problem: the same meaning in each
            mine, theirs = _kind(first[name]), _kind(p.hparams[name])
            if mine != theirs:
                raise fail("HyperOptimizer", f"problems[{k}]'s hyperparameter {name!r}",
                           f"{_describe(mine)} as in problems[0] (one raw value moves every "
                           "problem, so each must read it the same way)", _describe(theirs))
    return problems


def _kind(spec: Any) -> tuple[Any, ...]:
    """What a raw value means for ``spec``: its class, kind, shape, constraint, parameters and
    (discrete) choices."""
    return (type(spec).__name__, spec.kind, spec.shape, spec.constraint, spec.param_names,
            spec.param_shapes, getattr(spec, "choices", None))


def _describe(kind: tuple[Any, ...]) -> str:
    cls, name, shape, constraint, _, _, choices = kind
    text = f"{cls} {name!r} of shape {shape} with {constraint}"
    return text if choices is None else f"{text} over {list(choices)}"


def as_batches(selection: Any) -> list[Batch] | None:
    """``selection`` as a non-empty list of batches, read as ``val_data`` is (a batch, a list
    or iterable of batches, a DataLoader); ``None``: no selection split."""
    if selection is None:
        return None
    return validation_batches(selection, "HyperOptimizer", "selection")


MAX_SAMPLES = 16
"""The default ``max_samples``: a fixed ``samples`` refuses any other (nothing would read it)."""
SAMPLES_AUTO = "samples='auto'"


def auto_samples(samples: int | str, max_samples: int) -> AutoSamples | None:
    """``AutoSamples`` for ``samples="auto"``, ``None`` for a fixed count (with
    ``max_samples`` at its default :data:`MAX_SAMPLES`)."""
    if isinstance(samples, str):
        if samples != "auto":
            raise fail("HyperOptimizer", "samples", "a positive int or 'auto'", samples)
        return AutoSamples(maximum=max_samples)  # which checks it
    positive_int("HyperOptimizer", "max_samples", max_samples)
    if max_samples != MAX_SAMPLES:  # it bounds the automatic count only
        raise fail("HyperOptimizer", option("max_samples", "outer.max_samples"),
                   f"its default {MAX_SAMPLES} unless "
                   f"{option(SAMPLES_AUTO, 'outer.auto_samples = true')} (it bounds the "
                   "automatic number of samples only)", max_samples)
    return None


def check_selection(problem: Problem, selection: list[Batch] | None) -> None:
    """Evaluate ``val_loss`` once on the selection batches at theta_0: a batch it cannot take
    fails here with the shapes, not after the first training; warn when there is none."""
    if selection is None:
        _LOG.warning(
            "HyperOptimizer: no selection split: the best step and early stopping use the "
            "validation loss that the hypergradient descends, which many hyperparameters can "
            "overfit; %s", option("pass selection=batches held out from val_data",
                                  "set task.selection_fraction > 0"))
        return
    for batch in selection:
        check_batch("HyperOptimizer", "selection", batch)
    hview = problem.hparams.view(problem.raw_tensors())
    try:
        with torch.no_grad():
            value = float(validation_loss(replace(problem, val_data=selection), problem.params,
                                          problem.buffers, hview))
    except LossError as err:  # the loss's own error, without the loss-call wording
        cause = err.__cause__ if isinstance(err.__cause__, Exception) else err
        raise HyperdiffError(_selection_refused(problem, selection, cause)) from cause
    except HyperdiffError:
        raise
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as err:
        raise HyperdiffError(_selection_refused(problem, selection, err)) from err
    if not math.isfinite(value):
        raise fail("HyperOptimizer", "selection loss at the initial parameters",
                   "finite", value)


def _selection_refused(problem: Problem, selection: list[Batch], err: Exception) -> str:
    return ("HyperOptimizer: selection must be batches that val_loss accepts, like val_data "
            f"(selection batch: {shapes_of(selection[0])}; validation batch: "
            f"{shapes_of(problem.val_data[0])}; parameter shapes "
            f"{ {n: tuple(p.shape) for n, p in problem.params.items()} }): "
            f"{type(err).__name__}: {err}")


def check_warm_start(problems: Sequence[Problem], warm_start: bool) -> None:
    """Refuse ``warm_start`` for problems whose theta_0 is a hyperparameter
    (``hd.initialization``): a warm start trains each outer step from the last theta_T, so the
    learned theta_0 would never be trained from."""
    starts = sorted({p.initialization for p in problems if p.initialization is not None})
    if warm_start and starts:
        raise HyperdiffError(
            f"HyperOptimizer: {option('warm_start', 'inner.warm_start')} must be false for "
            f"a problem whose initialization is a hyperparameter (got true with the "
            f"initialization {starts[0]!r}): a warm start trains every outer step from the "
            "last step's theta_T, so theta_0 would never be used; drop the warm start or "
            "the initialization"
        )


def check_resume(state: dict[str, Any], *, records: int, slots: int) -> None:
    """A checkpoint ``state`` resumes a run with ``records`` history records and ``slots``
    trainings per step only when it was saved at step ``records`` with as many slots."""
    if records != state["step"]:
        raise HyperdiffError(
            f"HyperOptimizer: history must hold {state['step']} records to resume "
            f"(got {records})"
        )
    if len(state["warm"]) != slots:
        raise HyperdiffError(
            "HyperOptimizer: the checkpoint must come from a run with the same folds and "
            f"samples ({slots} trainings per step; got {len(state['warm'])})"
        )


def check_driver_state(driver: Any, plan: Any, state: dict[str, Any],
                       records: Sequence[Any]) -> None:
    """A checkpoint ``state`` of :class:`~hyperdiff.tuner.driver.HyperOptimizer` ``driver`` with
    the offline ``plan`` must be shaped like the driver's own
    (:mod:`hyperdiff.tuner.state_checks`) and its counters those of the ``records`` on disk:
    the best step and the steps since, the trainings, the guard's."""
    caller = "HyperOptimizer"
    fresh = driver.state_dict()
    if missing := sorted(set(fresh) - set(state) - set(LEGACY_OPTIONAL)):
        refuse_online_state(state)
        raise damaged(caller, "the state", f"a dict with the entries {missing}",
                      "a dict without them")
    if unknown := sorted(map(str, set(state) - set(fresh))):
        raise damaged(caller, "the state", f"a dict without the entries {unknown}",
                      "a dict with them")
    check_resume(state, records=len(records), slots=len(plan.warm))
    check_same_start(driver, plan, state, records)
    check_optimizer_state(driver.optimizer, state["optimizer"])
    for key in ("step", "raw", "since_best", "elapsed", "trainings", "rng"):
        check_like(caller, key, state[key], fresh[key])
    check_like(caller, "stopped", state["stopped"], None if state["stopped"] is None else "")
    if "discrete" in fresh:  # the REINFORCE baseline: None before the first step
        average = state["discrete"].get("moving_average") if isinstance(
            state["discrete"], dict) else 0.0
        check_like(caller, "discrete", state["discrete"],
                   {"moving_average": None if average is None else 0.0})
    check_optimizer_shapes(caller, "optimizer", driver.optimizer, state["optimizer"])
    check_warm(plan, state["warm"])
    check_best(caller, state["best"], fresh["raw"], state["since_best"], records)
    check_count(caller, "trainings", state["trainings"],
                records[-1].trainings if records else 0, "those of the last record")
    if "explored" in fresh:
        check_like(caller, "explored", state["explored"], fresh["explored"])
    failed = [r.status == "failed" for r in records]
    phase = plan.gradient_start_of(state)  # a failed point of the global phase cuts no lr,
    restarted = set(restarts(records, phase)) if phase else set()  # nor a start over
    reverted = check_reverted(caller, state.get("reverted", []), "reverted" in fresh, records,
                              phase)
    check_guard_state(caller, state["guard"], driver.guard.state_dict(),
                      {"raw": fresh["raw"], "optimizer": driver.optimizer,
                       "warm": state["warm"]}, failed, driver.guard.shrink,
                      cuts=[(f and r.step >= phase and r.step not in restarted)
                            or r.step in reverted for f, r in zip(failed, records, strict=True)],
                      rescued=bool(failed) and failed[0] and phase > 0)


LEGACY_OPTIONAL = ("seed",)
"""Entries of an offline state that checkpoints saved before s42 lack (accepted without)."""


def check_same_start(driver: Any, plan: Any, state: dict[str, Any],
                     records: Sequence[Any]) -> None:
    """A checkpoint resumes only the run that saved it: one with the loop's seed (where the
    state records it) and whose first record holds the loop's start values, exactly as
    recorded; else the resumed steps would draw the global phase's points and the minibatch
    seeds of another run, or start from other values than the history's."""
    caller = "HyperOptimizer"
    if "seed" in state:
        check_like(caller, "seed", state["seed"], 0)
        if state["seed"] != driver.seed:
            raise fail(caller, option("seed", "outer.seed"), f"the saved run's, {state['seed']} "
                       "(the global phase's points and the minibatch seeds of the resumed "
                       "steps follow it)", driver.seed)
    start_raw = getattr(plan, "_start", None)  # the offline plan's (a meta plan keeps none)
    if not records or start_raw is None:
        return
    start = natural_values(driver.hparams, start_raw)
    saved = records[0].hparams
    if saved != start:
        differ = sorted(n for n in set(start) | set(saved) if saved.get(n) != start.get(n))
        shown = "; ".join(f"{n}={start.get(n)!r} where the history has {saved.get(n)!r}"
                          for n in differ[:3])
        raise fail(caller, "the start values", "the saved run's, those its history's step 0 "
                   "records (a resumed run with another start would search around it; resume "
                   "with the start the run had)",
                   Text(shown + ("; ..." if len(differ) > 3 else "")))


def refuse_online_state(state: Any) -> None:
    """Name an online run's state (its window, inner step and tangent) given to the offline
    plan, instead of calling it damaged."""
    if isinstance(state, dict) and {"window", "inner_step", "tangent"} <= set(state):
        raise HyperdiffError("HyperOptimizer: the state must be an offline run's (got an online "
                             "run's, with its window and inner step); load it into "
                             "HyperOptimizer(problem, plan=hd.plans.OnlinePlan(...))")


def check_reverted(caller: str, reverted: Any, expected: bool, records: Sequence[Any],
                   phase: int) -> set[int]:
    """The steps after which a run with ``revert`` went back to its best values: increasing
    steps of successful gradient-phase records (``expected``: the run has ``revert``)."""
    if not expected:
        return set()
    ok = {r.step for r in records if r.status == "ok" and r.step >= phase}
    if not (isinstance(reverted, list) and all(isinstance(s, int) and s in ok for s in reverted)
            and reverted == sorted(set(reverted))):
        raise damaged(caller, "the state['reverted']", "increasing steps of the history's "
                      "successful gradient-phase records", shape_of(reverted))
    return set(reverted)


def check_warm(plan: Any, warm: list[Any]) -> None:
    """Each warm slot ``None`` or ``(params, buffers)`` like its problem's (fold-major slots);
    ``None`` everywhere without warm starts (``plan``: the offline plan)."""
    for slot, saved in enumerate(warm):
        problem = plan.problems[slot // plan.samples]
        like = None if saved is None or not plan.warm_start else (problem.params,
                                                                     problem.buffers)
        check_like("HyperOptimizer", f"warm[{slot}]", saved, like)


def check_best(caller: str, best: Any, raw: dict[str, Any], since_best: int,
               records: Sequence[Any]) -> None:
    """``best`` like the driver's record of its best step, that step the last record marked
    best, and ``since_best`` the records after it (all of them before any best step)."""
    marked = [r.step for r in records if r.best]
    if best is None:
        if marked:
            raise damaged(caller, "best", f"the record of step {marked[-1]}, the last one "
                          "marked best", "None")
        check_count(caller, "since_best", since_best, len(records),
                    "the records, none of them best")
        return
    selection = None if best.get("selection") is None else 0.0
    check_like(caller, "best", best, {"step": 0, "raw": raw, "value": 0.0, "val": 0.0,
                                      "selection": selection})
    check_count(caller, "best['step']", best["step"], marked[-1] if marked else -1,
                "the last record marked best")
    check_count(caller, "since_best", since_best, len(records) - 1 - best["step"],
                "the records after the best one")


OPTIMIZER_CLASS = "class"  # the outer optimizer's class name, in a saved state (since s39)


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
                          caller: str = "HyperOptimizer") -> None:
    """A saved outer optimizer ``state`` must be ``optimizer``'s kind (its class, where the
    state names it; a probe copy loaded with it steps) and hold every entry
    ``optimizer.step`` needs."""
    saved = state.get(OPTIMIZER_CLASS) if isinstance(state, dict) else None
    if saved is not None and saved != type(optimizer).__name__:
        raise HyperdiffError(f"{caller}: the outer optimizer must be the saved run's "
                             f"({saved!r}; got {type(optimizer).__name__!r}); resume with the "
                             "outer optimizer the run had")
    if missing := missing_optimizer_entries(optimizer, state):
        raise HyperdiffError(f"{caller}: the outer optimizer state lacks the entries "
                             f"{missing} that {type(optimizer).__name__} needs")
    if isinstance(state, dict) and isinstance(state.get("param_groups"), list) and (
            why := lacks_setting(optimizer, state)):
        raise HyperdiffError(f"{caller}: the outer optimizer must be the saved run's: "
                             f"{type(optimizer).__name__} cannot step from its saved state "
                             f"({why[:200]}); resume with the outer optimizer the run had")


def missing_optimizer_entries(optimizer: torch.optim.Optimizer, state: dict[str, Any]
                              ) -> list[str]:
    """Per-parameter entries (``exp_avg``, ``square_avg``, ...) that ``optimizer.step`` needs
    and a non-empty saved parameter state lacks, found by one step of a probe optimizer."""
    fresh = optimizer_probe_state(optimizer)
    needed = set().union(*(entry.keys() for entry in fresh.values()))
    saved = [set(entry) for entry in state.get("state", {}).values() if entry]
    return sorted(set().union(*(needed - entry for entry in saved)))
