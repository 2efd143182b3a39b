"""Is a loaded checkpoint state shaped like the one this run would write? One check each.

A checkpoint that the run directory's manifest lists can still be damaged (edited, with the
manifest fixed up to match). Before anything uses it, a state is compared with a freshly built
one of the same run: the same keys, a tensor where a tensor is (of the same shape, dtype and
device), ``None`` where ``None`` is, numbers where numbers are. A mismatch is one
:class:`~hyperdiff.errors.HyperdiffError`::

    <caller>: the checkpoint is damaged: <entry> must be <expected> (got <found>)
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError, describe, is_number


def damaged(caller: str, entry: str, expected: str, found: str) -> HyperdiffError:
    """The error for a state whose ``entry`` is ``found`` where ``expected`` was due."""
    return HyperdiffError(f"{caller}: the checkpoint is damaged: {entry} must be {expected} "
                          f"(got {found})")


def shape_of(value: Any) -> str:
    """What ``value`` is, as far as the structure goes: a tensor's shape, dtype and device."""
    if isinstance(value, Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"a {dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    if value is None:
        return "None"
    if isinstance(value, dict):
        return f"a dict with the keys {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} entries"
    return f"{type(value).__name__} {describe(value)}"


def leaf_kind(value: Any) -> str:
    """What a leaf that is not a tensor or container must be: ``None``, a bool, a number (int
    or float alike: counters are checked on their own) or its type."""
    if value is None or isinstance(value, bool):
        return repr(value) if value is None else "a bool"
    return "a number" if is_number(value) else f"a {type(value).__name__}"


def mismatch(saved: Any, fresh: Any, entry: str) -> tuple[str, str, str] | None:
    """The first ``(entry, expected, found)`` where ``saved`` is not shaped like ``fresh``
    (recursively through dicts, lists and tuples), or ``None``.

    >>> fresh = {"z": [torch.zeros(3, 5)], "steps": 0}
    >>> mismatch({"z": [torch.zeros(3, 4)], "steps": 7}, fresh, "state")[::2]
    ("state['z'][0]", 'a float32 tensor of shape (3, 4) on cpu')
    >>> mismatch({"z": None, "steps": 7}, fresh, "state")
    ("state['z']", 'a list of 1 entries', 'None')
    """
    if isinstance(fresh, Tensor):
        same = isinstance(saved, Tensor) and (saved.shape, saved.dtype, saved.device) == (
            fresh.shape, fresh.dtype, fresh.device)
        return None if same else (entry, shape_of(fresh), shape_of(saved))
    if isinstance(fresh, dict):
        if not isinstance(saved, dict) or set(saved) != set(fresh):
            return entry, shape_of(fresh), shape_of(saved)
        pairs = [(saved[k], fresh[k], f"{entry}[{k!r}]") for k in fresh]
    elif isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
            return entry, shape_of(fresh), shape_of(saved)
        pairs = [(s, f, f"{entry}[{i}]") for i, (s, f) in enumerate(zip(saved, fresh, strict=True))]
    else:
        kind = leaf_kind(fresh)
        return None if leaf_kind(saved) == kind else (entry, kind, shape_of(saved))
    for args in pairs:
        if (found := mismatch(*args)) is not None:
            return found
    return None


def check_like(caller: str, entry: str, saved: Any, fresh: Any) -> None:
    """Raise the damaged-checkpoint error where ``saved`` is not shaped like ``fresh``."""
    if (found := mismatch(saved, fresh, entry)) is not None:
        raise damaged(caller, *found)


def check_count(caller: str, entry: str, saved: Any, expected: int, why: str) -> None:
    """A saved counter must be the int ``expected`` that the history on disk implies."""
    if isinstance(saved, bool) or not isinstance(saved, int) or saved != expected:
        raise damaged(caller, entry, f"{expected} ({why})", describe(saved))


def check_guard_state(caller: str, saved: Any, fresh: dict[str, Any], good: Any,
                      failed: list[bool], shrink: float, *, cuts: list[bool] | None = None,
                      rescued: bool = False) -> None:
    """A saved divergence guard: entries like ``fresh`` (a new guard's ``state_dict``), its
    snapshot (if any) like ``good`` (an optimizer there: a state of it), and the counts those
    of the history's ``failed`` records: all of them, the counted ones that end it (after the
    last success), ``shrink ** cuts`` (``cuts``: the failures that count and cut the outer
    learning rate, default all of them); a snapshot
    exactly when a record succeeded, or when the plan went on from a failed start
    (``rescued``: the start is then the snapshot)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("reference"), dict):
        raise damaged(caller, "guard", "a dict with a 'reference' dict", shape_of(saved))
    template = {**fresh, "good": saved.get("good"),
                "reference": {kind: 0.0 for kind in saved["reference"]
                              if kind in ("validation", "selection")}}
    check_like(caller, "guard", saved, template)
    if (saved["good"] is None) == (False in failed or rescued):
        raise damaged(caller, "guard['good']", "the snapshot of the last good step" if
                      False in failed or rescued else "None (no step of the history succeeded)",
                      shape_of(saved["good"]))
    if (snapshot := saved["good"]) is not None:
        if not isinstance(snapshot, dict) or set(snapshot) != set(good):
            raise damaged(caller, "guard['good']", f"a dict with the keys {sorted(good)}",
                          shape_of(snapshot))
        for key, like in good.items():
            entry = f"guard['good'][{key!r}]"
            if isinstance(like, torch.optim.Optimizer):
                check_optimizer_shapes(caller, entry, like, snapshot[key])
            else:
                check_like(caller, entry, snapshot[key], like)
    counted = failed if cuts is None else cuts
    last_ok = next((i + 1 for i in reversed(range(len(failed))) if not failed[i]), 0)
    trailing = sum(counted[last_ok:])
    check_count(caller, "guard['total_failures']", saved["total_failures"], sum(failed),
                "the failed records in the history")
    check_count(caller, "guard['failures']", saved["failures"], trailing,
                "the failed records that end the history")
    scale = shrink ** sum(counted)
    if not math.isclose(float(saved["scale"]), scale, rel_tol=1e-9):
        raise damaged(caller, "guard['scale']", f"{scale:.6g} (shrink ** the failed records"
                      f"{'' if cuts is None else ' that cut it'})", f"{saved['scale']!r}")


def probe_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A fresh optimizer of ``optimizer``'s class and settings over zero-gradient copies of its
    parameters, to step without touching the run."""
    params = [p.detach().clone().requires_grad_() for g in optimizer.param_groups
              for p in g["params"]]
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults hold more
    probe = type(optimizer)(params, **{k: v for k, v in optimizer.defaults.items()
                                       if k in accepted})
    for p in params:
        p.grad = torch.zeros_like(p)
    return probe


def optimizer_probe_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The per-parameter state of one step of a probe copy of ``optimizer``: the entries,
    shapes and dtypes that a saved state of it holds."""
    probe = probe_optimizer(optimizer)
    probe.step()
    return probe.state_dict()["state"]


def lacks_setting(optimizer: torch.optim.Optimizer, state: Any) -> str:
    """The setting that a probe copy of ``optimizer`` loaded with the saved ``state`` reads and
    does not find (another optimizer's settings: ``KeyError: 'betas'`` deep in torch), or
    ``""`` (a state that fails otherwise is left to the shape checks)."""
    probe = probe_optimizer(optimizer)
    try:
        probe.load_state_dict(copy.deepcopy(state))
        probe.step()
    except KeyError as err:
        return f"KeyError: {err}"
    except Exception:  # damaged entries: the shape checks name them
        return ""
    return ""


def check_optimizer_shapes(caller: str, entry: str, optimizer: torch.optim.Optimizer,
                           state: Any) -> None:
    """Each non-empty per-parameter entry of a saved optimizer ``state`` must be shaped like
    one step of ``optimizer``'s (tensors of the parameter's shape and dtype, its ``step``)."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        raise damaged(caller, entry, "an optimizer state_dict with a 'state' dict",
                      shape_of(state))
    fresh = optimizer_probe_state(optimizer)
    for index, saved in state["state"].items():
        if index not in fresh:
            raise damaged(caller, f"{entry}['state']", f"entries for the parameters "
                          f"{sorted(fresh)}", f"an entry for {index!r}")
        if saved:
            check_like(caller, f"{entry}['state'][{index!r}]", saved, fresh[index])


__all__ = ["check_count", "check_guard_state", "check_like", "check_optimizer_shapes",
           "damaged", "lacks_setting", "leaf_kind", "mismatch", "optimizer_probe_state",
           "probe_optimizer", "shape_of"]
