"""A ``DataLoader`` read in the order a ``Trainer`` reads it, replayable step by step.

A ``Trainer`` iterates ``iter(loader)`` once per epoch, so with ``K = len(loader)`` batches per
epoch, inner step ``t`` is batch ``j`` of epoch ``e`` (``e, j = divmod(t, K)``). A shuffling
loader draws its order from its ``torch.Generator``; :class:`TrainerOrder` records that
generator's state at the start of every epoch, so epoch ``e`` is replayed by putting the state
back and iterating again, ``len(loader)`` batches and not one more, as a ``Trainer`` does.
The batches are fingerprinted by ``hd.make_problem``'s
``fn(step)`` source (:class:`hyperdiff.engine.data.FromCallable`), which refuses a replay that
differs. A sampler that draws from torch's global random state (``shuffle=True`` without
``generator=``, a ``SubsetRandomSampler`` or ``WeightedRandomSampler`` without one) cannot be
replayed and is refused at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.typing import Batch


def _generators(loader: DataLoader) -> list[torch.Generator]:
    """The distinct generators a loader's iteration draws from: its own, its sampler's, its
    batch sampler's sampler's."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, loader.sampler, getattr(batch_sampler, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


class TrainerOrder:
    """``order(step)``: the batch a ``Trainer`` trains on at global step ``step``."""

    def __init__(self, loader: Any, caller: str):
        if not isinstance(loader, DataLoader):
            raise HyperdiffError(f"{caller}: train_dataloader() must return a "
                                 f"torch.utils.data.DataLoader (got {describe(loader)})")
        samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
        if any(isinstance(s, RandomSampler) and s.generator is None for s in samplers):
            raise HyperdiffError(
                f"{caller}: the train DataLoader must shuffle from a seeded generator to be "
                "replayed (got shuffle=True without generator=, which draws from torch's global "
                "random state); pass DataLoader(..., shuffle=True, "
                "generator=torch.Generator().manual_seed(0))")
        for sampler in (*samplers, loader.batch_sampler):
            if hasattr(sampler, "generator") and vars(sampler).get("generator", 0) is None:
                name = type(sampler).__name__
                raise HyperdiffError(
                    f"{caller}: the train DataLoader's sampler must draw from a seeded "
                    f"generator to be replayed (got a {name} without generator=, which draws "
                    f"from torch's global random state); pass {name}(..., "
                    "generator=torch.Generator().manual_seed(0))")
        try:
            self.per_epoch = len(loader)
        except TypeError:
            raise HyperdiffError(f"{caller}: the train DataLoader must have a length (got "
                                 f"{describe(loader)} over an iterable data set)") from None
        if self.per_epoch < 1:
            raise HyperdiffError(f"{caller}: the train DataLoader must yield at least one batch "
                                 "per epoch (got 0)")
        self.loader = loader
        self.generators = _generators(loader)
        self.starts = [self._state()]  # generator states at the start of epochs 0, 1, ...
        self.epoch, self.position = -1, 0
        self.batches: Iterator[Batch] = iter(())

    def _state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def _open(self, epoch: int) -> None:
        """Start reading ``epoch`` from the recorded state of its start (recording the start
        of every epoch before it on the way)."""
        while len(self.starts) <= epoch:
            self._open(len(self.starts) - 1)
            self._read(self.per_epoch - 1)
            self.starts.append(self._state())
        for gen, state in zip(self.generators, self.starts[epoch], strict=True):
            gen.set_state(state)
        with torch.random.fork_rng(devices=[]):  # a loader without generator seeds its workers
            self.batches = iter(self.loader)     # from torch's: leave the user's state alone
        self.epoch, self.position = epoch, 0

    def _read(self, index: int) -> Batch:
        """Batch ``index`` of the open epoch, reading on from the current position (never
        past ``len(loader)`` batches: a ``Trainer`` stops there, and asking a ``RandomSampler``
        for more would draw its next permutation from the generator)."""
        while True:
            try:
                batch = next(self.batches)
            except StopIteration:
                raise HyperdiffError(
                    f"data: the train DataLoader must yield len(loader) = {self.per_epoch} "
                    f"batches in every epoch (got {self.position} in epoch {self.epoch})"
                ) from None
            self.position += 1
            if self.position > index:
                return batch

    def __call__(self, step: int) -> Batch:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self.epoch or index < self.position:
            self._open(epoch)
        return self._read(index)
