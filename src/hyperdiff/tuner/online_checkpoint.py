"""The online plan's part of a checkpoint: what a resumed online run needs beyond the loop's.

The outer loop (:meth:`~hyperdiff.tuner.driver.HyperOptimizer.state_dict`) saves the raw values,
the outer optimizer's state (under ``"outer"``), the guard, the step and the clock; the online
plan adds plain tensors, numbers and strings (``torch.save`` / weights-only loading): the
parameters, buffers and inner optimizer state, the carried tangents (forward mode's,
curvature's), the training seed and the inner step (which fix the data position: minibatches
and dropout masks are functions of ``(train seed, step)``, validation draws of ``(seed, h)``),
the records, the hot-start measure and where the values settled (``settled_at``,
:mod:`hyperdiff.tuner.settling`). The layout is the one the online tuner wrote before the one
loop, so its checkpoints resume unchanged.

:func:`check_tuner_state` refuses a damaged state before anything uses it (one
:mod:`hyperdiff.tuner.state_checks` error naming the entry): every entry shaped like the tuner's own
(tangents like the method's ``carry_like``: forward mode's ``(P, *leaf)`` per state leaf,
curvature's :func:`~hyperdiff.methods.curvature.initial_tangent`), and the counters consistent
with the history: ``inner_step`` the steps of the ok windows since the hot-start restart, a
tangent exactly when a method whose capabilities say ``carries_state`` has trained since
and the run has not settled (``settled_at``: None, or an inner step up to ``inner_step``),
curvature's ``steps`` equal to ``inner_step``, the guard's failure counts and scale those of
the failed records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hyperdiff.engine.training import TrainState
from hyperdiff.errors import HyperdiffError, fail
from hyperdiff.tree import tree_flatten, tree_unflatten
from hyperdiff.tuner.driver_checks import check_optimizer_state
from hyperdiff.tuner.history import StepRecord
from hyperdiff.tuner.hot_start import FRACTION
from hyperdiff.tuner.online_rescue import leading_failures
from hyperdiff.tuner.online_run import Loop, OnlineRun
from hyperdiff.tuner.state_checks import (
    check_count,
    check_guard_state,
    check_like,
    check_optimizer_shapes,
    damaged,
    shape_of,
)
from hyperdiff.tuner.windows import window_stop

FORMAT = "hyperdiff-online-1"
# absent from checkpoints of older versions (discrete: before REINFORCE and annealing online;
# growth: before growing windows, K steps each; samples: before online samples, 1;
# val_batch_size, train_seed: not recorded before, not checked then; rescues: before the
# rescue, 0; settled_at: before settling, never settled; schedule_over: before the choice,
# the outer lr's cosine over the windows; lowering: before it, every move kept, 1; retries:
# before the retries of a weak or hot start, 0; seed, steps, method_options: not recorded before
# s39, not checked then)
OPTIONAL = ("guard", "hot_start", "restarted", "discrete", "growth", "samples", "val_batch_size",
            "rescues", "train_seed", "settled_at", "schedule_over", "lowering", "retries",
            "seed", "steps", "method_options")


def method_options(method: Any) -> dict[str, Any]:
    """``method``'s name and options as a checkpoint compares them: numbers, strings, None and
    their lists as they are, anything else (a solver object) by its type name."""
    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return type(value).__name__

    return {"name": method.name, **{k: plain(v) for k, v in sorted(method.options.items())}}


def _caller(run: OnlineRun) -> str:
    """Who names a damaged checkpoint in messages: ``"HyperOptimizer.load_state_dict"`` (the
    deprecated shim's ``"OnlineTuner.load_state_dict"``)."""
    return f"{run.caller}.load_state_dict"


def tuner_state(run: OnlineRun, loop: Loop) -> dict[str, Any]:
    """The online plan's entries of the checkpoint (copies)."""
    opt_leaves = tree_flatten(run.state.opt_state)[0]
    tangent = None if run.tangent is None else tree_flatten(tuple(run.tangent))[0]
    return {
        "format": FORMAT, "method": run.label, "window": run.window, "growth": run.growth,
        "samples": run.samples, "val_batch_size": run.val_batch_size,
        "train_seed": run.problem.seed, "schedule_over": run.schedule_over,
        "lowering": run.lowering, "seed": loop.seed, "steps": run.problem.steps,
        "method_options": method_options(run.method),
        "inner_step": run.inner_step,
        "params": {k: v.clone() for k, v in run.state.params.items()},
        "buffers": {k: v.clone() for k, v in run.state.buffers.items()},
        "opt_state": [x.clone() for x in opt_leaves],
        "tangent": None if tangent is None else [z.clone() for z in tangent],
        "history": [r.to_json() for r in loop.history],
        "hot_start": None if run.hot_start_measure is None else list(run.hot_start_measure),
        "restarted": run.restarted,
        "rescues": run.rescues,
        "retries": run.retries,
        "settled_at": run.settled_at,
    }


def restore_tuner(run: OnlineRun, loop: Loop, state: dict[str, Any],
                  records: Sequence[StepRecord] | None = None) -> list[StepRecord]:
    """Check ``state`` (a whole checkpoint of a loop with ``run``'s method and window), put the
    plan's entries back into ``run`` and return the records the loop keeps: ``records`` (e.g.
    from the run directory) or those the state holds, up to its step."""
    caller = _caller(run)
    if isinstance(state, dict) and {"best", "since_best", "warm"} <= set(state):
        raise HyperdiffError(f"{caller}: the state must be an online run's (got an offline "
                             "run's, with its best step and warm starts); load it into "
                             "HyperOptimizer(problem) with the offline plan")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise fail(caller, "state", f"a state_dict of format {FORMAT}",
                   state.get("format") if isinstance(state, dict) else state)
    # checkpoints from before the growth: K steps each; from before online samples: one
    saved = {"growth": 0.0, "samples": 1, "val_batch_size": run.val_batch_size,
             "train_seed": run.problem.seed, "schedule_over": "windows", "lowering": 1.0,
             "seed": loop.seed, "steps": run.problem.steps,
             "method_options": method_options(run.method), **state}
    if isinstance(state.get("tangent"), list):  # an older layout of the method's carry
        state = {**state, "tangent": run.method.saved_carry(run.problem, state["tangent"])}
    for key, mine in (("method", run.label), ("window", run.window), ("growth", run.growth),
                      ("samples", run.samples), ("val_batch_size", run.val_batch_size),
                      ("train_seed", run.problem.seed), ("schedule_over", run.schedule_over),
                      ("lowering", run.lowering), ("seed", loop.seed),
                      ("steps", run.problem.steps), ("method_options", method_options(run.method))):
        if saved.get(key) != mine:
            raise HyperdiffError(f"{caller}: {key} must match the saved run "
                                 f"({saved.get(key)!r}; got {mine!r})")
    lines: Any = [r.to_json() for r in records] if records is not None else state.get("history")
    check_tuner_state(run, loop, state, lines)
    params = {k: v.clone() for k, v in state["params"].items()}
    template = tree_flatten(run.problem.optimizer.init(params))[1]
    opt_state = tree_unflatten([x.clone() for x in state["opt_state"]], template)
    run.state = TrainState(params, {k: v.clone() for k, v in state["buffers"].items()},
                           opt_state)
    run.tangent = None
    if state["tangent"] is not None:
        raw = loop.hparams.unflatten(loop.hparams.flatten(state["raw"]))
        like = run.method.carry_like(run.problem, raw, run.state)
        tangent = tree_unflatten([z.clone() for z in state["tangent"]],
                                 tree_flatten(tuple(like))[1])
        # forward mode carries a plain tuple shaped like the state, curvature its NamedTuple
        run.tangent = tangent if isinstance(like, TrainState) else type(like)(*tangent)
    run.inner_step = int(state["inner_step"])
    measured = state.get("hot_start")  # checkpoints written before the measure have none
    run.hot_start_measure = None if measured is None else (int(measured[0]), float(measured[1]))
    run.restarted = bool(state.get("restarted", False))
    run.rescues = int(state.get("rescues", 0))
    run.retries, run.pending_retry = int(state.get("retries", 0)), None
    run.settled_at = state.get("settled_at")
    return [StepRecord.from_json(line) for line in lines][: state["step"]]


def check_tuner_state(run: OnlineRun, loop: Loop, state: dict[str, Any], lines: Any) -> None:
    """Refuse a ``state`` (of ``run``'s method and window) that is not shaped like ``loop``'s
    own or whose counters disagree with the history ``lines`` (module doc)."""
    caller = _caller(run)
    fresh = loop.state_dict()
    if missing := sorted(set(fresh) - set(state) - set(OPTIONAL)):
        raise damaged(caller, "the state", f"a dict with the entries {missing}",
                      "a dict without them")
    if unknown := sorted(map(str, set(state) - set(fresh))):
        raise damaged(caller, "the state", f"a dict without the entries {unknown}",
                      "a dict with them")
    for key in ("step", "inner_step", "elapsed", "raw", "params", "buffers", "opt_state"):
        check_like(caller, key, state[key], fresh[key])
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise damaged(caller, "history", "a list of JSON lines", shape_of(lines))
    if len(lines) < state["step"]:
        raise damaged(caller, "history", f"at least step = {state['step']} records",
                      f"{len(lines)}")
    records = [StepRecord.from_json(line) for line in lines[: state["step"]]]
    check_optimizer_state(loop.optimizer, state["outer"], caller=caller)
    check_optimizer_shapes(caller, "outer", loop.optimizer, state["outer"])
    inner, restart_at = trained_steps(run, records, bool(state.get("restarted", False)))
    check_count(caller, "inner_step", state["inner_step"], inner,
                "the steps of the ok windows in the history"
                + (f" after the hot-start restart at step {restart_at}"
                   if restart_at is not None else ""))
    settled = state.get("settled_at")
    if settled is not None and (type(settled) is not int or not 0 < settled <= inner):
        raise damaged(caller, "settled_at", f"None or an inner step in 1..{inner} (where the "
                      "plain windows began)", repr(settled))
    # a settled run dropped its carry: a tangent only while it tunes
    check_tangent(run, loop, state["tangent"], inner if settled is None else 0)
    failed = [r.status == "failed" for r in records]
    tries = leading_failures(records)  # a rescued or retried start's failed tries
    retries = state.get("retries", 0)  # online_retry.py's, +k warmer or -k cooler
    if type(retries) is not int or abs(retries) > min(tries, run.retry):
        raise damaged(caller, "retries", f"an int of at most {min(tries, run.retry)} in size "
                      "(the failed records before the first ok one, at most the plan's retry)",
                      repr(retries))
    check_count(caller, "rescues", state.get("rescues", 0), min(tries - abs(retries),
                                                                  run.rescue),
                "the failed records before the first ok one that are not retries, at most "
                "the plan's rescue")
    if "guard" in state:  # the tries' failures do not cut the outer learning rate
        check_guard_state(caller, state["guard"], loop.guard.state_dict(),
                          {"raw": fresh["raw"], "outer": loop.optimizer}, failed,
                          loop.guard.shrink, cuts=[f and i >= tries for i, f in enumerate(failed)],
                          rescued=state.get("rescues", 0) > 0 or retries != 0)
    if "hot_start" in state:
        check_like(caller, "hot_start", state["hot_start"], None if state["hot_start"] is None
                   else [0, 0.0])
    if "restarted" in state:
        check_like(caller, "restarted", state["restarted"], False)
    if "discrete" in state and "discrete" in fresh:
        average = state["discrete"].get("moving_average") if isinstance(
            state["discrete"], dict) else 0.0
        check_like(caller, "discrete", state["discrete"],
                   {"moving_average": None if average is None else 0.0})


def trained_steps(run: OnlineRun, records: Sequence[StepRecord], restarted: bool
                  ) -> tuple[int, int | None]:
    """The inner step that ``records`` end at: ``min(t + K, N)`` per ok window (failed ones
    were discarded), back to 0 after the window where a restarted run restarted (the first
    that reached :data:`~hyperdiff.tuner.hot_start.FRACTION` of the run); and that record's
    step (``None``: no restart)."""
    caller = _caller(run)
    steps, target = run.problem.steps, math.ceil(FRACTION * run.problem.steps)
    position, restart_at = 0, None
    for record in records:
        if record.status != "ok":
            continue
        start, position = position, window_stop(position, steps, run.window, run.growth)
        if restarted and restart_at is None and start < target <= position:
            position, restart_at = 0, record.step
    if restarted and restart_at is None:
        raise damaged(caller, "restarted", "False (no window of the history reached the "
                      "hot-start measure)", "True")
    return position, restart_at


def check_tangent(run: OnlineRun, loop: Loop, saved: Any, inner_step: int) -> None:
    """Forward and curvature carry a tangent once they trained a window, shaped like a fresh
    run's; the others carry none."""
    caller = _caller(run)
    carries = run.method.capabilities.carries_state and inner_step > 0
    if not carries:
        check_like(caller, "tangent", saved, None)
        return
    raw = run.problem.raw_tensors(loop.raw)
    like = run.method.carry_like(run.problem, raw, run.state)
    fresh = tree_flatten(tuple(like))[0]
    if saved is None:
        raise damaged(caller, "tangent", f"a list of {len(fresh)} tensors (the run trained "
                      f"{inner_step} steps with method {run.label!r})", "None")
    check_like(caller, "tangent", saved, fresh)
    if hasattr(like, "steps"):  # a carry that counts the steps it averaged (curvature's)
        check_count(caller, "tangent[-1] (the curvature steps)", int(saved[-1]), inner_step,
                    "inner_step")


__all__ = ["FORMAT", "check_tuner_state", "restore_tuner", "tuner_state"]
