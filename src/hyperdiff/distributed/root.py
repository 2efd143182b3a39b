"""Work that rank 0 does for everyone: the run directory, and anything read from disk.

:class:`OnRoot` wraps an object (a :class:`~hyperdiff.rundir.RunDir`) so that each call of one
of its public methods runs on rank 0 only, and its return value, or the error it raised,
reaches every rank by one broadcast. So rank 0 alone writes the history, the checkpoints and
the result, every rank resumes from the very checkpoint rank 0 read, and a failure there (a
full disk, a refused resume) ends every rank with the same error. Calls are collectives: every
rank must make them in the same order, as :func:`~hyperdiff.experiment.run_experiment` does.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from ..errors import HyperdiffError
from .group import Group, current_group


def on_root(group: Group | None, where: str, fn: Callable[..., Any], *args: Any,
            **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` computed on rank 0 and returned (or raised) on every rank."""
    if group is None:
        return fn(*args, **kwargs)
    outcome: tuple[str, Any] | None = None
    if group.is_root:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except Exception as err:
            outcome = ("error", _picklable(err))
    outcome = group.broadcast(where, outcome)
    assert outcome is not None  # rank 0 always sends one
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def _picklable(err: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return HyperdiffError(f"rank 0: {type(err).__name__}: {err}")


class OnRoot:
    """``target``'s public methods run on rank 0 only (see the module doc); attributes that
    are not methods (``rundir.path``) are read locally."""

    def __init__(self, target: Any, group: Group | None):
        self._target, self._group = target, group

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            kind = type(self._target).__name__
            return on_root(self._group, f"{kind}.{name}", value, *args, **kwargs)

        return call


def root_only(make: Callable[[], Any], group: Any = None) -> Any:
    """``make()`` in one process; else the object rank 0 made (sent to every rank, so a run
    directory named after rank 0's clock is the same everywhere) as an :class:`OnRoot`."""
    found = current_group(group)
    if found is None:
        return make()
    return OnRoot(on_root(found, "run directory", make), found)


def is_root(group: Any = None) -> bool:
    """True on rank 0 of ``group`` (the default group), and in a single process."""
    found = current_group(group)
    return found is None or found.is_root


__all__ = ["OnRoot", "is_root", "on_root", "root_only"]
