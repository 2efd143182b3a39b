"""The process group hyperdiff runs on, and how it fails: lost ranks are named, never hung on.

:func:`current_group` wraps an initialised ``torch.distributed`` process group (or the one you
pass) in a :class:`Group`; :func:`init_from_env` initialises the default group from the
variables that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), with gloo on
CPU and NCCL when the ranks drive GPUs.

Failure handling. Each rank beats a heartbeat key in the group's store
(``ProcessGroup.get_group_store``) every ``HEARTBEAT_S`` seconds from a daemon thread. Before
every collective hyperdiff issues, :meth:`Group.barrier` marks the rank's arrival in the store
and waits for the others' marks; the collective itself is started asynchronously and polled.
Both waits check the awaited ranks' heartbeats every ``HEARTBEAT_S``: a rank silent for
``STALE_S`` (dead, or stopped: SIGSTOP stops its heartbeat thread too) is named as lost within
about ``STALE_S + HEARTBEAT_S`` seconds whatever ``timeout_s`` is, and one that is alive but
does not arrive within ``timeout_s`` is named as hung. Every other rank then stops with a
:class:`LostRankError` such as ``"outer step 3: rank 1 is lost: no heartbeat for 3.1 s (the
process died or is stopped)"``, instead of a hang or an anonymous socket error. Under
``torchrun``, whose agent stops the surviving workers with SIGTERM when one dies,
:func:`raise_on_sigterm` turns that SIGTERM into the same error; and a process that raised one
exits at once (status 1) rather than wait in the backend's shutdown for the lost rank.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hyperdiff.errors import HyperdiffError, positive_float

log = logging.getLogger("hyperdiff.distributed")

HEARTBEAT_S = 0.5
"""Seconds between two heartbeats of a rank."""
STALE_S = 3.0
"""A rank whose heartbeat is older than this is lost."""
DEFAULT_TIMEOUT_S = 300.0
"""Default seconds to wait for a rank that is alive but does not arrive (hung)."""

_LOST = False
"""Set once a :class:`Group` raised a :class:`LostRankError`: the process group is broken."""


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
        # the group's own store (ProcessGroup.get_group_store); a second client (clone) serves
        # the heartbeat thread, so the two threads never share a socket
        owner: Any = self._world_group if group is None else group
        base = owner.get_group_store()
        self.store = dist.PrefixStore(f"hyperdiff/{_group_name(group)}/", base)
        self._seq = 0
        self.stale_s = STALE_S
        self.agreed: set[str] = set()  # the checks of the ranks' inputs done on this group
        self._stop = threading.Event()
        try:
            beat_base = base.clone()  # type: ignore[union-attr]
        except (AttributeError, RuntimeError):  # a store without clients (file, hash store)
            beat_base = base
        self._beat_store = dist.PrefixStore(f"hyperdiff/{_group_name(group)}/", beat_base)
        self._beat()
        self._thread = threading.Thread(target=self._beat_loop, daemon=True,
                                        name=f"hyperdiff-heartbeat-{self.rank}")
        self._thread.start()
        _stop_at_exit()

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
        waiting = [r for r in range(self.world) if r != self.rank]

        def missing() -> list[int]:
            waiting[:] = [r for r in waiting if not self._has(f"{key}{r}")]
            return waiting

        self._await(where, missing)
        if self._seq > 2:  # keep the store small: the marks of older barriers are not read
            self._delete(f"at/{self._seq - 2}/{self.rank}")

    def _await(self, where: str, missing: Callable[[], list[int]],
               done: threading.Event | None = None) -> None:
        """Poll ``missing()`` (the ranks still awaited) until it is empty, checking their
        heartbeats every :data:`HEARTBEAT_S`: raise :class:`LostRankError` as soon as one is
        silent for :data:`STALE_S` (dead or stopped), or when ``timeout_s`` has passed.
        Between polls it sleeps, or waits on ``done`` (set when the awaited thing finishes);
        both let a signal handler run (torchrun's SIGTERM). Once a rank was lost, the first
        check comes at once (the clean-up after the error)."""
        started = time.monotonic()
        last_look = started - HEARTBEAT_S if _LOST else started
        pause = 1e-4
        while waiting := missing():  # store.wait would log a warning at every short timeout
            now = time.monotonic()
            if now - last_look > HEARTBEAT_S:
                last_look, waited = now, now - started
                silent = self.silent_ranks(waiting)
                if silent or waited > self.timeout_s:
                    raise _lost_error(self._lost_message(where, waiting, silent, waited))
            if done is not None:
                done.wait(HEARTBEAT_S)
            else:
                time.sleep(pause)
                pause = min(2 * pause, 0.01)

    def _finish(self, where: str, work: Any) -> None:
        """Wait for an asynchronous collective (a ``torch.distributed`` work handle) the way
        :meth:`_await` waits, instead of blocking inside the backend for its whole timeout
        (a stopped rank keeps its sockets open, so the backend alone would wait that long)."""
        others = [r for r in range(self.world) if r != self.rank]
        done = threading.Event()  # set by the backend's thread: no polling delay
        work.get_future().add_done_callback(lambda _future: done.set())
        self._await(where, lambda: [] if done.is_set() else others, done)
        work.wait()  # the backend's own error, if it failed (a dead peer's closed socket)

    def collective(self, where: str, fn: Callable[[], Any], *, barrier: bool = True) -> None:
        """Run ``fn()``, which starts a collective and returns its work handle
        (``async_op=True``), after a :meth:`barrier` (which names the ranks that do not
        arrive), and wait for it with heartbeat checks; a backend error is reported with the
        ranks that are lost."""
        if barrier:
            self.barrier(where)
        try:
            self._finish(where, fn())
        except RuntimeError as err:
            raise self.lost(where, f"a collective failed ({err})") from err

    def lost(self, where: str, err: BaseException | str) -> LostRankError:
        """The :class:`LostRankError` for a collective that failed with ``err``: waits up to
        :data:`STALE_S` for the heartbeats to tell which ranks are gone."""
        others = [r for r in range(self.world) if r != self.rank]
        deadline = time.monotonic() + self.stale_s + 2 * HEARTBEAT_S
        silent = self.silent_ranks(others)
        while not silent and time.monotonic() < deadline:
            time.sleep(HEARTBEAT_S)
            silent = self.silent_ranks(others)
        if silent:
            return _lost_error(self._lost_message(where, sorted(silent), silent, 0.0))
        return _lost_error(f"{where}: {err} on rank {self.rank} of {self.world} while every "
                             "rank's heartbeat is alive")

    def terminated(self) -> LostRankError:
        """The :class:`LostRankError` of a rank that its launcher stops with SIGTERM, as
        ``torchrun`` stops the other workers when one fails: it names the rank whose heartbeat
        stopped (waiting up to :data:`STALE_S` for it to show)."""
        return self.lost("torchrun stopped this rank (SIGTERM)", "the launcher sent SIGTERM")

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

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, where: str, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks, in place (and returned); no barrier first, as
        the all-reduces inside a data-parallel training are many and small."""
        self.collective(where, lambda: dist.all_reduce(tensor, group=self.group,
                                                       async_op=True), barrier=False)
        return tensor

    def all_gather(self, where: str, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank: the
        lengths of the pickles, then the pickles padded to the longest, in two all-gathers."""
        data = self._to_bytes(value)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        self.collective(where, lambda: dist.all_gather(sizes, size, group=self.group,
                                                       async_op=True))
        longest = int(max(int(n) for n in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: data.numel()] = data
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.collective(where, lambda: dist.all_gather(parts, padded, group=self.group,
                                                       async_op=True))
        return [_from_bytes(part[: int(n)]) for part, n in zip(parts, sizes, strict=True)]

    def broadcast(self, where: str, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` on every rank (its pickle's length, then the pickle)."""
        root = dist.get_global_rank(self.group, src) if self.group is not None else src
        data = self._to_bytes(value) if self.rank == src else None
        size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64,
                            device=self.device)
        self.collective(where, lambda: dist.broadcast(size, src=root, group=self.group,
                                                      async_op=True))
        box = data if data is not None else torch.empty(int(size), dtype=torch.uint8,
                                                         device=self.device)
        self.collective(where, lambda: dist.broadcast(box, src=root, group=self.group,
                                                      async_op=True))
        return value if self.rank == src else _from_bytes(box)

    @property
    def device(self) -> torch.device:
        """Where the backend takes tensors: the rank's GPU for NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _to_bytes(self, value: Any) -> Tensor:
        return torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).to(
            self.device)


def _from_bytes(data: Tensor) -> Any:
    return pickle.loads(data.cpu().numpy().tobytes())


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
    group = current_group(timeout_s=timeout_s)
    if group is not None:
        raise_on_sigterm(group)
    return group


def raise_on_sigterm(group: Group) -> None:
    """Make SIGTERM raise ``group.terminated()`` in the main thread (when SIGTERM still has
    its default action): ``torchrun`` stops the surviving workers with SIGTERM when one dies,
    and each then reports which rank was lost instead of vanishing without a word."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        raise group.terminated()

    signal.signal(signal.SIGTERM, handler)


def forget_groups() -> None:
    """Stop the heartbeats of every :class:`Group` made here (before destroying the groups;
    also run at exit)."""
    for group in _GROUPS.values():
        group.close()
    _GROUPS.clear()


def _lost_error(message: str) -> LostRankError:
    """The :class:`LostRankError` of ``message``, noting that the process group is broken."""
    global _LOST
    _LOST = True
    return LostRankError(message)


def _at_exit() -> None:
    """Stop the heartbeats; after a :class:`LostRankError`, end the process at once with
    status 1: the backend's shutdown of a broken group waits for the lost rank, a stopped
    rank's pending collective for the whole timeout (``distributed.timeout_s``)."""
    forget_groups()
    if _LOST:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(1)


_EXIT_REGISTERED = False


def _stop_at_exit() -> None:
    """Register :func:`_at_exit` once, when the first :class:`Group` starts its heartbeat
    (importing hyperdiff registers nothing)."""
    global _EXIT_REGISTERED
    if not _EXIT_REGISTERED:
        atexit.register(_at_exit)
        _EXIT_REGISTERED = True


__all__ = ["Group", "LostRankError", "current_group", "forget_groups", "init_from_env",
           "raise_on_sigterm"]
