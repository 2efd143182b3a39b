"""The process group hyperdiff runs on, and how it fails: lost ranks are named, never hung on.

:func:`current_group` wraps an initialised ``torch.distributed`` process group (or the one you
pass) in a :class:`Group`; :func:`init_from_env` initialises the default group from the
variables that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), with gloo on
CPU and NCCL when the ranks drive GPUs.

Failure handling. Each rank beats a heartbeat key in the group's store every
``HEARTBEAT_S`` seconds from a daemon thread, and before every collective hyperdiff issues,
:meth:`Group.barrier` marks the rank's arrival in the store and waits for the others' marks.
A rank that does not arrive within ``timeout_s`` is named as hung; one whose heartbeat stops
is named as lost as soon as that is seen (a few seconds), so a dead or stuck rank ends the run
on every other rank with a :class:`LostRankError` such as
``"outer step 3 (spread): rank 1 is lost: no heartbeat for 3.1 s (the process died or is
stopped)"``, instead of a hang or an anonymous socket error.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import HyperdiffError, positive_float

log = logging.getLogger("hyperdiff.distributed")

HEARTBEAT_S = 0.5
"""Seconds between two heartbeats of a rank."""
STALE_S = 3.0
"""A rank whose heartbeat is older than this is lost."""
DEFAULT_TIMEOUT_S = 300.0
"""Default seconds to wait for a rank that is alive but does not arrive (hung)."""

T = TypeVar("T")


class LostRankError(HyperdiffError):
    """A rank died, stopped or hung: the run cannot go on (resume from the last checkpoint)."""


class Group:
    """A process group with rank helpers, store-based monitored barriers and heartbeats.

    Args:
        group: a ``torch.distributed`` process group (``None``: the default group).
        timeout_s: seconds to wait at a barrier for a rank whose heartbeat is alive.
    """

    def __init__(self, group: Any = None, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        if not (dist.is_available() and dist.is_initialized()):
            raise HyperdiffError("distributed: a process group must be initialised (call "
                                 "torch.distributed.init_process_group or launch with torchrun)")
        self.group = group
        self._world_group = dist.group.WORLD  # held: its id keys the cache of groups
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.timeout_s = positive_float("distributed", "timeout_s", timeout_s)
        # the rendezvous store of the default group (torch has no public accessor); a second
        # client (clone) serves the heartbeat thread, so the two threads never share a socket
        base = dist.distributed_c10d._get_default_store()
        self.store = dist.PrefixStore(f"hyperdiff/{_group_name(group)}/", base)
        self._seq = 0
        self.stale_s = STALE_S
        self._stop = threading.Event()
        try:
            beat_base = base.clone()  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # a store without clients (file, hash store)
            beat_base = base
        self._beat_store = dist.PrefixStore(f"hyperdiff/{_group_name(group)}/", beat_base)
        self._beat()
        self._thread = threading.Thread(target=self._beat_loop, daemon=True,
                                        name=f"hyperdiff-heartbeat-{self.rank}")
        self._thread.start()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world={self.world}, backend={self.backend!r})"

    # ------------------------------------------------------------------ heartbeats
    def _beat(self) -> None:
        self._beat_store.set(f"beat/{self.rank}", repr(time.time()))

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # the store is gone: the run is ending
                return

    def close(self) -> None:
        """Stop the heartbeat thread and wait for it (the process group itself is left alone):
        a thread still inside a store call when the process exits aborts it."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=4 * HEARTBEAT_S)

    def silent_ranks(self, ranks: list[int]) -> dict[int, float]:
        """Of ``ranks``, those whose heartbeat is older than :data:`STALE_S`: rank -> age."""
        now, out = time.time(), {}
        for rank in ranks:
            try:
                age = now - float(self.store.get(f"beat/{rank}").decode())
            except Exception:  # no heartbeat ever, or the store is unreachable
                age = float("inf")
            if age > self.stale_s:
                out[rank] = age
        return out

    # ------------------------------------------------------------------ barriers
    def barrier(self, where: str) -> None:
        """Wait until every rank reaches this point; raise :class:`LostRankError` naming the
        ranks that died (heartbeat stopped) or did not arrive within ``timeout_s``."""
        self._seq += 1
        key = f"at/{self._seq}/"
        self.store.set(f"{key}{self.rank}", where)
        others = [r for r in range(self.world) if r != self.rank]
        started = last_look = time.monotonic()
        pause = 1e-4
        missing = others
        while missing:  # poll (store.wait would log a warning at every short timeout)
            missing = [r for r in missing if not self._has(f"{key}{r}")]
            now = time.monotonic()
            if missing and now - last_look > HEARTBEAT_S:
                last_look, waited = now, now - started
                silent = self.silent_ranks(missing)
                if silent or waited > self.timeout_s:
                    raise LostRankError(self._lost_message(where, missing, silent, waited))
            if missing:
                time.sleep(pause)
                pause = min(2 * pause, 0.01)
        if self._seq > 2:  # keep the store small: the marks of older barriers are not read
            self._delete(f"at/{self._seq - 2}/{self.rank}")

    def collective(self, where: str, fn: Callable[[], T]) -> T:
        """``fn()`` (a collective) after a :meth:`barrier`; a backend error is reported with
        the ranks that are lost."""
        self.barrier(where)
        try:
            return fn()
        except RuntimeError as err:
            raise self.lost(where, err) from err

    def lost(self, where: str, err: BaseException) -> LostRankError:
        """The :class:`LostRankError` for a collective that failed with ``err``: waits up to
        :data:`STALE_S` for the heartbeats to tell which ranks are gone."""
        others = [r for r in range(self.world) if r != self.rank]
        deadline = time.monotonic() + self.stale_s + 2 * HEARTBEAT_S
        silent = self.silent_ranks(others)
        while not silent and time.monotonic() < deadline:
            time.sleep(HEARTBEAT_S)
            silent = self.silent_ranks(others)
        if silent:
            return LostRankError(self._lost_message(where, sorted(silent), silent, 0.0))
        return LostRankError(f"{where}: a collective failed on rank {self.rank} of {self.world} "
                             f"while every rank's heartbeat is alive: {err}")

    def _lost_message(self, where: str, missing: list[int], silent: dict[int, float],
                      waited: float) -> str:
        parts = []
        for rank in missing:
            if rank in silent:
                age = silent[rank]
                why = ("no heartbeat can be read" if age == float("inf")
                       else f"no heartbeat for {age:.1f} s")
                parts.append(f"rank {rank} is lost: {why} (the process died or is stopped)")
            else:
                parts.append(f"rank {rank} did not arrive within {waited:.0f} s (hung?)")
        return (f"{where}: {'; '.join(parts)}; rank {self.rank} of {self.world} stops. Resume "
                "from the last checkpoint with `hyperdiff run --resume RUN_DIR`")

    def _has(self, key: str) -> bool:
        try:
            return bool(self.store.check([key]))
        except Exception:
            return False

    def _delete(self, key: str) -> None:
        with contextlib.suppress(Exception):  # some stores cannot delete; the marks are tiny
            self.store.delete_key(key)

    # ------------------------------------------------------------------ object collectives
    def all_gather(self, where: str, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        self.collective(where, lambda: dist.all_gather_object(out, value, group=self.group))
        return out

    def broadcast(self, where: str, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` on every rank."""
        box = [value if self.rank == src else None]
        root = dist.get_global_rank(self.group, src) if self.group is not None else src
        self.collective(where, lambda: dist.broadcast_object_list(box, src=root,
                                                                  group=self.group))
        return box[0]


_GROUPS: dict[tuple[str, int], Group] = {}


def _group_name(group: Any) -> str:
    return "default" if group is None else str(dist.get_process_group_ranks(group))


def _group_key(group: Any) -> tuple[str, int]:
    """Name and identity of the process group (a re-initialised group is a new one)."""
    return _group_name(group), id(dist.group.WORLD if group is None else group)


def current_group(group: Any = None, *, timeout_s: float | None = None) -> Group | None:
    """The :class:`Group` for ``group`` (a :class:`Group`, a process group, or ``None``: the
    initialised default group), or ``None`` when no group of more than one rank is set up."""
    if isinstance(group, Group):
        return group
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise HyperdiffError("distributed: group must be a process group of an initialised "
                                 f"torch.distributed (got {type(group).__name__} with none "
                                 "initialised)")
        return None
    if dist.get_world_size(group) < 2:
        return None
    key = _group_key(group)
    if key not in _GROUPS:
        _GROUPS[key] = Group(group, timeout_s=timeout_s or DEFAULT_TIMEOUT_S)
    elif timeout_s is not None:
        _GROUPS[key].timeout_s = positive_float("distributed", "timeout_s", timeout_s)
    return _GROUPS[key]


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> Group | None:
    """Initialise the default process group from ``torchrun``'s environment when it asks for
    more than one rank (gloo, or NCCL with one GPU per rank: ``LOCAL_RANK`` picks the device);
    return its :class:`Group`, or ``None`` for a single process."""
    if dist.is_available() and dist.is_initialized():
        return current_group(timeout_s=timeout_s)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or not dist.is_available():
        return None
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and os.environ.get("HYPERDIFF_BACKEND", "") != "gloo":
            backend = "nccl"
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        log.info("distributed: rank %d of %d (%s)", dist.get_rank(), world, backend)
    return current_group(timeout_s=timeout_s)


def forget_groups() -> None:
    """Stop the heartbeats of every :class:`Group` made here (before destroying the groups;
    also run at exit)."""
    for group in _GROUPS.values():
        group.close()
    _GROUPS.clear()


atexit.register(forget_groups)


__all__ = ["Group", "LostRankError", "current_group", "forget_groups", "init_from_env"]
