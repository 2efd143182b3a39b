"""Lazy, replay-verified reading of re-iterables: ``IterableDataset`` loaders, generator
functions and any other object that can be iterated more than once.

Epoch ``e`` of seed ``s`` is one fresh iteration with a private random state seeded from
``(s, e)`` (:mod:`.random_state`): the loader's and its samplers' ``generator=`` attributes get
a private generator (a ``DataLoader`` without one gets one, which seeds its workers), while
torch's, Python's and NumPy's global generators stay the user's and are only watched. An
iterable seen drawing from them has its epoch read again with the private states made the
global ones while its code runs (and the user's restored after each call). So an iterable whose
randomness comes from those generators yields the same epoch every time; anything else (a
private unseeded RNG, a file that changed) is caught by the fingerprints of :mod:`.replay`.

Batches are read as training asks for them; a window of the last ``window`` batches is kept.
A request behind the open iteration restarts the epoch and skips forward (re-reading from the
epoch start: sources with random access, such as a map-style ``DataLoader``, use
:mod:`.loader` instead). Epoch lengths are learned as epochs end, and verified on replays.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch

from hyperdiff.engine.data.failures import check_devices, check_finite, check_rows, user_code
from hyperdiff.engine.data.permutation import mix
from hyperdiff.engine.data.random_state import DrewGlobal, PrivateRandom, ReadRandomness
from hyperdiff.engine.data.replay import ReplayLog, fingerprint
from hyperdiff.engine.data.sources import BatchSource
from hyperdiff.errors import HyperdiffError, positive_int
from hyperdiff.tree import leaves
from hyperdiff.typing import Batch

T = TypeVar("T")
ADVICE = (
    "pass a DataLoader over a map-style Dataset (hyperdiff seeds its shuffling), a list of "
    "batches, hd.minibatches(...), or a function fn(step, seed) that returns the batch"
)


class Streamed(BatchSource):
    """A source read lazily through a bounded window of cached batches.

    Subclasses implement ``_fill(step, seed)``, which reads batches and hands each to
    ``_keep`` (verification, then the cache), ending with the batch of ``step``.
    """

    def __init__(self, name: str, window: int, advice: str = ADVICE):
        self.name, self.window = name, positive_int("data", "window", window)
        self.cache: OrderedDict[tuple[int, int], Batch] = OrderedDict()
        self.spans: dict[tuple[int, int], list[tuple[torch.device, int, int]]] = {}  # extents
        self.log = ReplayLog(name, advice)  # what a replay error advises
        self.horizon = 0  # the largest number of steps announced through check()

    def check(self, steps: int, seed: int) -> None:
        self.horizon = max(self.horizon, steps)
        self.batch(0, seed)

    def batch(self, step: int, seed: int) -> Batch:
        key = (seed, step)
        if key not in self.cache:
            self._fill(step, seed)
        self.cache.move_to_end(key)
        return self.cache[key]

    def epoch_length(self, seed: int) -> int:
        """Number of batches in epoch 0 (see subclasses for unbounded streams)."""
        raise NotImplementedError

    def _fill(self, step: int, seed: int) -> None:
        raise NotImplementedError

    def where(self, step: int, seed: int) -> str:
        """The batch of ``step`` in messages."""
        return f"the batch of step {step} (seed {seed}) of train_data {self.name}"

    def sample_indices(self, step: int, seed: int) -> list[int] | None:
        """The dataset index of each row of the batch of ``step``, where known."""
        return None

    def _keep(self, seed: int, step: int, batch: Batch) -> None:
        if (seed, step) not in self.log.prints:  # a first read: rows, finite values?
            check_devices(partial(self.where, step, seed), batch)
            check_rows(partial(self.where, step, seed), batch)
            check_finite(partial(self.where, step, seed), batch,
                         partial(self.sample_indices, step, seed))
        self.cache[(seed, step)] = self.log.check(seed, step, batch)
        self._check_not_overwritten((seed, step), batch)
        self.cache.move_to_end((seed, step))
        while len(self.cache) > self.window:
            dropped, _ = self.cache.popitem(last=False)
            self.spans.pop(dropped, None)

    def _check_not_overwritten(self, key: tuple[int, int], batch: Batch) -> None:
        """Refuse a batch written into the memory of a kept batch (a ``collate_fn`` or dataset
        that fills one buffer for every batch): the kept one would now hold other values than
        it was read with, and a replay or a backward pass would read those. Only kept batches
        whose memory the new one overlaps are fingerprinted again (views of the same rows, or
        of overlapping windows of one tensor, keep their values and pass)."""
        memory = extents(batch)
        for other, kept in self.cache.items():
            if other == key or not overlap(memory, self.spans.get(other, [])):
                continue
            if fingerprint(kept) != self.log.prints.get(other):
                raise HyperdiffError(
                    f"data: {self.where(key[1], key[0])} must be new tensors (got tensors in "
                    f"the memory of the batch of step {other[1]} (seed {other[0]}), whose "
                    "values it overwrote: a collate_fn or dataset that fills one buffer for "
                    "every batch); hyperdiff keeps earlier batches to replay them, so return "
                    "fresh tensors (torch.stack, or .clone() the buffer)")
        self.spans[key] = memory  # measured once per kept batch, not at every later read


def extents(batch: Batch) -> list[tuple[torch.device, int, int]]:
    """``(device, first byte, end)`` of the memory each tensor of ``batch`` spans."""
    spans = []
    for _, leaf in leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.numel() > 0:
            size = leaf.element_size()
            reach = sum((n - 1) * abs(s) for n, s in zip(leaf.shape, leaf.stride(), strict=True))
            spans.append((leaf.device, leaf.data_ptr(), leaf.data_ptr() + (reach + 1) * size))
    return spans


def overlap(a: list[tuple[torch.device, int, int]], b: list[tuple[torch.device, int, int]]
            ) -> bool:
    """Whether any span of ``a`` shares a byte with a span of ``b`` on the same device."""
    return any(da == db and sa < eb and sb < ea for da, sa, ea in a for db, sb, eb in b)


@dataclass
class _EpochRun:
    """An open iteration over epoch ``epoch`` of ``seed``; ``next_step`` is its next global step."""

    seed: int
    epoch: int
    first_step: int
    next_step: int
    iterator: Iterator[Batch]
    rng: PrivateRandom


class IterableStream(Streamed):
    """A re-iterable (or a zero-argument function returning a fresh iterator), epoch by epoch."""

    def __init__(self, iterable: Any, name: str, *, factory: bool = False, window: int = 8):
        super().__init__(name, window)
        self.iterable, self.factory = iterable, factory
        self.epoch_starts: dict[int, list[int]] = {}  # seed -> first step of epochs 0, 1, ...
        self.run: _EpochRun | None = None
        self.randomness = ReadRandomness(iterable)

    def epoch_length(self, seed: int) -> int:
        """Batches in epoch 0, read up to ``max(steps, 1)`` batches (a stream may be endless)."""
        limit = max(self.horizon, 1)
        starts = self.epoch_starts.setdefault(seed, [0])
        step = 0
        while len(starts) < 2 and step < limit:
            self.batch(step, seed)
            step += 1
        return starts[1] if len(starts) > 1 else limit

    def _user(self, rng: PrivateRandom, where: Callable[[], str], fn: Callable[[], T]) -> T:
        """``fn()``, the iterable's own code, under ``rng``; its failures named by ``where``."""
        def named() -> T:
            with user_code(where):
                return fn()

        return self.randomness.call(rng, named)

    def _open(self, seed: int, epoch: int, first_step: int) -> _EpochRun:
        rng = PrivateRandom(mix(seed, epoch))
        def where() -> str:
            return f"epoch {epoch} (seed {seed}) of train_data {self.name}"

        made = self._user(rng, where, self.iterable if self.factory else partial(iter,
                                                                                 self.iterable))
        if self.factory and not isinstance(made, Iterator):
            if isinstance(made, (torch.Tensor, tuple, dict, str, bytes)) or not isinstance(
                made, Iterable
            ):
                raise HyperdiffError(
                    f"data: train_data {self.name}, a function of no arguments, must return an "
                    f"iterator of batches (got {type(made).__name__}); for one batch per step "
                    "write fn(step) or fn(step, seed)"
                )
            made = self._user(rng, where, partial(iter, made))
        return _EpochRun(seed, epoch, first_step, first_step, made, rng)

    def _start_for(self, step: int, seed: int) -> _EpochRun:
        starts = self.epoch_starts.setdefault(seed, [0])
        epoch = max(e for e, first in enumerate(starts) if first <= step)
        return self._open(seed, epoch, starts[epoch])

    def _fill(self, step: int, seed: int) -> None:
        try:
            self._read_to(step, seed)
        except DrewGlobal:  # it draws from the global generators: its epoch again, swapped
            self.run = None
            self._read_to(step, seed)

    def _read_to(self, step: int, seed: int) -> None:
        run = self.run
        if run is None or run.seed != seed or run.next_step > step:
            run = self.run = None  # release the open iteration (and any workers) before the next
            run = self.run = self._start_for(step, seed)
        while run.next_step <= step:
            try:
                batch = self._user(run.rng, partial(self.where, run.next_step, seed),
                                   partial(next, run.iterator))
            except StopIteration:
                run = self.run = self._next_epoch(run)
                continue
            self._keep(seed, run.next_step, batch)
            run.next_step += 1

    def _next_epoch(self, run: _EpochRun) -> _EpochRun:
        """Record (or verify) where epoch ``run.epoch`` ended and open the next one."""
        length = run.next_step - run.first_step
        if length == 0:
            why = ("an iterator or generator object is used up after one pass: pass a list, a "
                   "DataLoader, or a zero-argument function that returns a new iterator")
            if isinstance(self.iterable, torch.utils.data.DataLoader):
                why = ("a DataLoader yields none when its sampler is empty or, with "
                       "drop_last=True, draws fewer samples than batch_size="
                       f"{self.iterable.batch_size}")
            raise HyperdiffError(
                f"data: train_data {self.name} must yield at least one batch per epoch (got an "
                f"empty epoch {run.epoch} at step {run.first_step}, seed {run.seed}); {why}")
        starts = self.epoch_starts.setdefault(run.seed, [0])
        if len(starts) > run.epoch + 1:
            known = starts[run.epoch + 1] - starts[run.epoch]
            self.log.check_epoch(run.seed, run.epoch, known, length)
        else:
            starts.append(run.next_step)
        return self._open(run.seed, run.epoch + 1, run.next_step)
