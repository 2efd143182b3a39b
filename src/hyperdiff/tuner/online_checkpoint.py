"""Saving and restoring an online run: everything a resumed run needs to continue bit for bit.

The state is plain tensors, numbers and strings (``torch.save`` / weights-only loading): the
parameters, buffers and inner optimizer state, the raw values and the outer optimizer's state,
the carried tangents (forward mode's, curvature's), the step counters (which fix the data
position: minibatches and dropout masks are functions of ``(seed, step)``, validation draws of
``(seed, h)``), the records, the divergence guard and the hot-start measure.

:func:`check_tuner_state` refuses a damaged state before anything uses it (one
:mod:`hyperdiff.tuner.state_checks` error naming the entry): every entry shaped like the tuner's own
(tangents like the method's ``carry_like``: forward mode's ``(P, *leaf)`` per state leaf,
curvature's :func:`~hyperdiff.methods.curvature.initial_tangent`), and the counters consistent
with the history: ``inner_step`` the steps of the ok windows since the hot-start restart, a
tangent exactly when a method whose capabilities say ``carries_state`` has trained since,
curvature's ``steps`` equal to ``inner_step``, the guard's failure counts and scale those of
the failed records.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

from hyperdiff.engine.training import TrainState
from hyperdiff.errors import HyperdiffError, fail
from hyperdiff.tree import tree_flatten, tree_unflatten
from hyperdiff.tuner.driver_checks import check_optimizer_state
from hyperdiff.tuner.history import History, StepRecord
from hyperdiff.tuner.hot_start import FRACTION
from hyperdiff.tuner.online_run import OnlineRun
from hyperdiff.tuner.state_checks import (
    check_count,
    check_guard_state,
    check_like,
    check_optimizer_shapes,
    damaged,
    shape_of,
)

FORMAT = "hyperdiff-online-1"
CALLER = "OnlineTuner.load_state_dict"
OPTIONAL = ("guard", "hot_start", "restarted")  # absent from checkpoints of older versions


def tuner_state(tuner: OnlineRun) -> dict[str, Any]:
    """``tuner``'s state as a dict (copies)."""
    opt_leaves = tree_flatten(tuner.state.opt_state)[0]
    tangent = None if tuner.tangent is None else tree_flatten(tuple(tuner.tangent))[0]
    return {
        "format": FORMAT, "method": tuner.method, "window": tuner.window,
        "step": tuner.hyper_step, "inner_step": tuner.inner_step, "elapsed": tuner._elapsed,
        "raw": tuner.raw, "outer": tuner.optimizer.state_dict(),
        "params": {k: v.clone() for k, v in tuner.state.params.items()},
        "buffers": {k: v.clone() for k, v in tuner.state.buffers.items()},
        "opt_state": [x.clone() for x in opt_leaves],
        "tangent": None if tangent is None else [z.clone() for z in tangent],
        "history": [r.to_json() for r in tuner.history],
        "guard": copy.deepcopy(tuner.guard.state_dict()),
        "hot_start": None if tuner.hot_start_measure is None else list(tuner.hot_start_measure),
        "restarted": tuner.restarted,
    }


def restore_tuner(tuner: OnlineRun, state: dict[str, Any],
                  records: Sequence[StepRecord] | None = None) -> None:
    """Put :func:`tuner_state`'s ``state`` back into ``tuner`` (made with the same method and
    window); ``records`` (e.g. from the run directory) replace the history it holds."""
    caller = CALLER
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise fail(caller, "state", f"a state_dict of format {FORMAT}",
                   state.get("format") if isinstance(state, dict) else state)
    for key in ("method", "window"):
        if state.get(key) != getattr(tuner, key):
            raise HyperdiffError(f"{caller}: {key} must match the saved run "
                                 f"({state.get(key)!r}; got {getattr(tuner, key)!r})")
    lines: Any = [r.to_json() for r in records] if records is not None else state.get("history")
    check_tuner_state(tuner, state, lines)
    with torch.no_grad():
        tuner.flat.copy_(tuner.hparams.flatten(state["raw"]))
    tuner.optimizer.load_state_dict(state["outer"])
    params = {k: v.clone() for k, v in state["params"].items()}
    template = tree_flatten(tuner.problem.optimizer.init(params))[1]
    opt_state = tree_unflatten([x.clone() for x in state["opt_state"]], template)
    tuner.state = TrainState(params, {k: v.clone() for k, v in state["buffers"].items()},
                             opt_state)
    tuner.tangent = None
    if state["tangent"] is not None:
        like = tuner.window_method.carry_like(tuner.problem, tuner.raw, tuner.state)
        tangent = tree_unflatten([z.clone() for z in state["tangent"]],
                                 tree_flatten(tuple(like))[1])
        # forward mode carries a plain tuple shaped like the state, curvature its NamedTuple
        tuner.tangent = tangent if isinstance(like, TrainState) else type(like)(*tangent)
    tuner.inner_step, tuner._elapsed = int(state["inner_step"]), float(state["elapsed"])
    if "guard" in state:  # checkpoints written before the online guard have none
        tuner.guard.load_state_dict(copy.deepcopy(state["guard"]))
    measured = state.get("hot_start")  # checkpoints written before the measure have none
    tuner.hot_start_measure = None if measured is None else (int(measured[0]),
                                                             float(measured[1]))
    tuner.restarted = bool(state.get("restarted", False))
    tuner.history = History([StepRecord.from_json(line) for line in lines][: state["step"]])


def check_tuner_state(tuner: OnlineRun, state: dict[str, Any], lines: Any) -> None:
    """Refuse a ``state`` (of ``tuner``'s method and window) that is not shaped like
    ``tuner``'s own or whose counters disagree with the history ``lines`` (module doc)."""
    fresh = tuner_state(tuner)
    if missing := sorted(set(fresh) - set(state) - set(OPTIONAL)):
        raise damaged(CALLER, "the state", f"a dict with the entries {missing}",
                      "a dict without them")
    if unknown := sorted(map(str, set(state) - set(fresh))):
        raise damaged(CALLER, "the state", f"a dict without the entries {unknown}",
                      "a dict with them")
    for key in ("step", "inner_step", "elapsed", "raw", "params", "buffers", "opt_state"):
        check_like(CALLER, key, state[key], fresh[key])
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise damaged(CALLER, "history", "a list of JSON lines", shape_of(lines))
    if len(lines) < state["step"]:
        raise damaged(CALLER, "history", f"at least step = {state['step']} records",
                      f"{len(lines)}")
    records = [StepRecord.from_json(line) for line in lines[: state["step"]]]
    check_optimizer_state(tuner.optimizer, state["outer"], caller=CALLER)
    check_optimizer_shapes(CALLER, "outer", tuner.optimizer, state["outer"])
    inner, restart_at = trained_steps(tuner, records, bool(state.get("restarted", False)))
    check_count(CALLER, "inner_step", state["inner_step"], inner,
                "the steps of the ok windows in the history"
                + (f" after the hot-start restart at step {restart_at}"
                   if restart_at is not None else ""))
    check_tangent(tuner, state["tangent"], inner)
    if "guard" in state:
        check_guard_state(CALLER, state["guard"], tuner.guard.state_dict(),
                          {"raw": fresh["raw"], "outer": tuner.optimizer},
                          [r.status == "failed" for r in records], tuner.guard.shrink)
    if "hot_start" in state:
        check_like(CALLER, "hot_start", state["hot_start"], None if state["hot_start"] is None
                   else [0, 0.0])
    if "restarted" in state:
        check_like(CALLER, "restarted", state["restarted"], False)


def trained_steps(tuner: OnlineRun, records: Sequence[StepRecord], restarted: bool
                  ) -> tuple[int, int | None]:
    """The inner step that ``records`` end at: ``min(t + K, N)`` per ok window (failed ones
    were discarded), back to 0 after the window where a restarted run restarted (the first
    that reached :data:`~hyperdiff.tuner.hot_start.FRACTION` of the run); and that record's
    step (``None``: no restart)."""
    steps, target = tuner.problem.steps, math.ceil(FRACTION * tuner.problem.steps)
    position, restart_at = 0, None
    for record in records:
        if record.status != "ok":
            continue
        start, position = position, min(position + tuner.window, steps)
        if restarted and restart_at is None and start < target <= position:
            position, restart_at = 0, record.step
    if restarted and restart_at is None:
        raise damaged(CALLER, "restarted", "False (no window of the history reached the "
                      "hot-start measure)", "True")
    return position, restart_at


def check_tangent(tuner: OnlineRun, saved: Any, inner_step: int) -> None:
    """Forward and curvature carry a tangent once they trained a window, shaped like a fresh
    run's; the others carry none."""
    carries = tuner.window_method.capabilities.carries_state and inner_step > 0
    if not carries:
        check_like(CALLER, "tangent", saved, None)
        return
    raw = tuner.problem.raw_tensors(tuner.raw)
    like = tuner.window_method.carry_like(tuner.problem, raw, tuner.state)
    fresh = tree_flatten(tuple(like))[0]
    if saved is None:
        raise damaged(CALLER, "tangent", f"a list of {len(fresh)} tensors (the run trained "
                      f"{inner_step} steps with method {tuner.method!r})", "None")
    check_like(CALLER, "tangent", saved, fresh)
    if hasattr(like, "steps"):  # a carry that counts the steps it averaged (curvature's)
        check_count(CALLER, "tangent[-1] (the curvature steps)", int(saved[-1]), inner_step,
                    "inner_step")


__all__ = ["FORMAT", "check_tuner_state", "restore_tuner", "tuner_state"]
