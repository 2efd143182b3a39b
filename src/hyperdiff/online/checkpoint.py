"""Saving and restoring an online run: everything a resumed run needs to continue bit for bit.

The state is plain tensors, numbers and strings (``torch.save`` / weights-only loading): the
parameters, buffers and inner optimizer state, the raw values and the outer optimizer's state,
the carried tangents (forward mode's, curvature's), the step counters (which fix the data
position: minibatches and dropout masks are functions of ``(seed, step)``, validation draws of
``(seed, h)``), the records, the divergence guard and the hot-start measure.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..driver_checks import check_optimizer_state
from ..errors import HyperdiffError, fail
from ..history import History, StepRecord
from ..training import TrainState

if TYPE_CHECKING:
    from .loop import OnlineTuner

FORMAT = "hyperdiff-online-1"


def tuner_state(tuner: OnlineTuner) -> dict[str, Any]:
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


def restore_tuner(tuner: OnlineTuner, state: dict[str, Any],
                  records: Sequence[StepRecord] | None = None) -> None:
    """Put :func:`tuner_state`'s ``state`` back into ``tuner`` (made with the same method and
    window); ``records`` (e.g. from the run directory) replace the history it holds."""
    caller = "OnlineTuner.load_state_dict"
    if state.get("format") != FORMAT:
        raise fail(caller, "state", f"a state_dict of format {FORMAT}", state.get("format"))
    for key in ("method", "window"):
        if state[key] != getattr(tuner, key):
            raise HyperdiffError(f"{caller}: {key} must match the saved run ({state[key]!r}; "
                                 f"got {getattr(tuner, key)!r})")
    with torch.no_grad():
        tuner.flat.copy_(tuner.hparams.flatten(state["raw"]))
    check_optimizer_state(tuner.optimizer, state["outer"], caller=caller)
    tuner.optimizer.load_state_dict(state["outer"])
    params = {k: v.clone() for k, v in state["params"].items()}
    template = tree_flatten(tuner.problem.optimizer.init(params))[1]
    opt_state = tree_unflatten([x.clone() for x in state["opt_state"]], template)
    tuner.state = TrainState(params, {k: v.clone() for k, v in state["buffers"].items()},
                             opt_state)
    tuner.tangent = None
    if state["tangent"] is not None:
        like = tuner.window_method.tangent_like(tuner.problem, tuner.raw, tuner.state)
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
    lines = [r.to_json() for r in records] if records is not None else state["history"]
    tuner.history = History([StepRecord.from_json(line) for line in lines][: state["step"]])


__all__ = ["FORMAT", "restore_tuner", "tuner_state"]
