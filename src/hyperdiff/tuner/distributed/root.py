"""Work that rank 0 does for everyone: the run directory, and anything read from disk.

:class:`OnRoot` wraps an object (a :class:`~hyperdiff.app.rundir.RunDir`) so that each call of one
of its public methods runs on rank 0 only, and its return value, or the error it raised,
reaches every rank by one broadcast. So rank 0 alone writes the history, the checkpoints and
the result, every rank resumes from the very checkpoint rank 0 read, and a failure there (a
full disk, a refused resume) ends every rank with the same error. Calls are collectives: every
rank must make them in the same order, as :func:`~hyperdiff.app.experiment.run_experiment` does.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from hyperdiff.errors import HyperdiffError
from hyperdiff.tuner.distributed.group import Group, current_group


def on_root(group: Group | None, where: str, fn: Callable[..., Any], *args: Any,
            **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` computed on rank 0 and returned (or raised) on every rank; a
    value that cannot be pickled (a lock, an open file) stays on rank 0 and every rank gets an
    :class:`OnRoot` handle to it (``with rundir.lock():`` then locks on rank 0 only)."""
    if group is None:
        return fn(*args, **kwargs)
    outcome: tuple[str, Any] | None = None
    kept = None
    if group.is_root:
        try:
            kept = fn(*args, **kwargs)
            outcome = ("ok", kept) if _pickles(kept) else ("handle", None)
        except Exception as err:
            outcome = ("error", err if _pickles(err) else
                       HyperdiffError(f"rank 0: {type(err).__name__}: {err}"))
    outcome = group.broadcast(where, outcome)
    assert outcome is not None  # rank 0 always sends one
    if outcome[0] == "error":
        raise outcome[1]
    if outcome[0] == "handle":
        return OnRoot(kept, group, shared=False)
    return outcome[1]


def _pickles(value: Any) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False


class OnRoot:
    """``target``'s public methods run on rank 0 only (see the module doc). With ``shared``
    (every rank holds an equal ``target``) attributes that are not methods (``rundir.path``)
    are read locally; a handle to an object only rank 0 holds asks rank 0 for everything."""

    def __init__(self, target: Any, group: Group, *, shared: bool = True):
        self._target, self._group, self._shared = target, group, shared

    def _kind(self) -> str:
        return type(self._target).__name__ if self._shared else "handle"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._shared:
            value = getattr(self._target, name)
            is_method = callable(value)
        else:
            is_method = on_root(self._group, f"handle.{name}",
                                lambda: callable(getattr(self._target, name)))
        if not is_method:
            return value if self._shared else on_root(
                self._group, f"handle.{name}", lambda: getattr(self._target, name))

        def call(*args: Any, **kwargs: Any) -> Any:
            return on_root(self._group, f"{self._kind()}.{name}",
                           lambda: getattr(self._target, name)(*args, **kwargs))

        return call

    def __enter__(self) -> Any:
        return on_root(self._group, f"{self._kind()}.__enter__",
                       lambda: self._target.__enter__())

    def __exit__(self, *exc: Any) -> Any:
        if exc[0] is None:
            return on_root(self._group, f"{self._kind()}.__exit__",
                           lambda: self._target.__exit__(*exc))
        with suppress(Exception):  # e.g. a lost rank: the error being raised says more
            on_root(self._group, f"{self._kind()}.__exit__",
                    lambda: self._target.__exit__(*exc))
        return False


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
