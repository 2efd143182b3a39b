"""Deterministic batch sources for inner training.

Every hypergradient method replays the same training run (finite differences replay it 2k
times), so a source maps ``(step, seed)`` to a batch deterministically. :func:`as_source`
turns what users have into a source:

- a tensor, a tuple of tensors or a dict of tensors: one full batch, used at every step;
- a list: a sequence of batches, cycled in order;
- a re-iterable (``DataLoader``): iterated epoch after epoch, each epoch's shuffling seeded
  from ``(seed, epoch)``;
- a one-shot iterator: recorded as it is consumed, an error if it runs out before ``steps``;
- a callable ``fn(step)`` or a :class:`BatchSource`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from .errors import HyperdiffError, describe
from .typing import Batch


class BatchSource:
    """Base class: ``source.batch(step, seed)`` returns the batch of inner step ``step``."""

    def batch(self, step: int, seed: int) -> Batch:
        raise NotImplementedError

    def check(self, steps: int, seed: int) -> None:
        """Raise a clear error if fewer than ``steps`` batches are available."""


class FullBatch(BatchSource):
    """The same batch at every step."""

    def __init__(self, data: Batch):
        self.data = data

    def batch(self, step: int, seed: int) -> Batch:
        return self.data


class Sequence(BatchSource):
    """A fixed list of batches, cycled in order."""

    def __init__(self, batches: list[Batch]):
        if not batches:
            raise HyperdiffError("data: a list of batches must not be empty (got [])")
        self.batches = batches

    def batch(self, step: int, seed: int) -> Batch:
        return self.batches[step % len(self.batches)]


class Minibatches(BatchSource):
    """Random minibatches of ``tensors`` (all with the same first dimension), reshuffled every
    epoch from ``(seed, epoch)``; the last incomplete batch of an epoch is dropped."""

    def __init__(self, *tensors: Tensor, batch_size: int, shuffle: bool = True):
        if not tensors:
            raise HyperdiffError("minibatches: at least one tensor is required")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise HyperdiffError(
                "minibatches: tensors must share their first dimension "
                f"(got {[tuple(t.shape) for t in tensors]})"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not (
            1 <= batch_size <= n
        ):
            raise HyperdiffError(
                f"minibatches: batch_size must be an int in [1, {n}] (got {describe(batch_size)})"
            )
        self.tensors, self.batch_size, self.shuffle = tensors, batch_size, shuffle
        self.per_epoch = n // batch_size
        self._perm_cache: dict[tuple[int, int], Tensor] = {}

    def _permutation(self, seed: int, epoch: int) -> Tensor:
        key = (seed, epoch)
        if key not in self._perm_cache:
            n = self.tensors[0].shape[0]
            if self.shuffle:
                gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
                self._perm_cache[key] = torch.randperm(n, generator=gen)
            else:
                self._perm_cache[key] = torch.arange(n)
            if len(self._perm_cache) > 8:
                self._perm_cache.pop(next(iter(self._perm_cache)))
        return self._perm_cache[key]

    def batch(self, step: int, seed: int) -> Batch:
        epoch, index = divmod(step, self.per_epoch)
        perm = self._permutation(seed, epoch)
        rows = perm[index * self.batch_size : (index + 1) * self.batch_size].to(
            self.tensors[0].device
        )
        picked = tuple(t[rows] for t in self.tensors)
        return picked if len(picked) > 1 else picked[0]


def minibatches(*tensors: Tensor, batch_size: int, shuffle: bool = True) -> Minibatches:
    """Seeded random minibatches: ``hd.minibatches(x, y, batch_size=64)``."""
    return Minibatches(*tensors, batch_size=batch_size, shuffle=shuffle)


class Epochs(BatchSource):
    """A re-iterable (e.g. a ``DataLoader``) iterated epoch after epoch; each epoch's iterator
    is created under a global RNG seeded from ``(seed, epoch)``, which fixes its shuffling."""

    def __init__(self, iterable: Iterable[Batch]):
        self.iterable = iterable
        self._cache: dict[int, list[Batch]] = {}

    def _epoch(self, seed: int, epoch: int) -> list[Batch]:
        key = seed * 100_003 + epoch
        if key not in self._cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(key)
                batches = list(self.iterable)
            if not batches:
                raise HyperdiffError("data: the iterable yielded no batches (got an empty epoch)")
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = batches
        return self._cache[key]

    def batch(self, step: int, seed: int) -> Batch:
        first = self._epoch(seed, 0)
        epoch, index = divmod(step, len(first))
        batches = self._epoch(seed, epoch)
        if index >= len(batches):
            raise HyperdiffError(
                f"data: epoch {epoch} yielded {len(batches)} batches, fewer than the first "
                f"epoch's {len(first)}"
            )
        return batches[index]


class Recorded(BatchSource):
    """A one-shot iterator, recorded as it is consumed so that it can be replayed."""

    def __init__(self, iterator: Iterator[Batch]):
        self.iterator = iterator
        self.batches: list[Batch] = []
        self.exhausted = False

    def check(self, steps: int, seed: int) -> None:
        while len(self.batches) < steps and not self.exhausted:
            try:
                self.batches.append(next(self.iterator))
            except StopIteration:
                self.exhausted = True
        if len(self.batches) < steps:
            raise HyperdiffError(
                f"data: the train_data iterator ran out after {len(self.batches)} batches, but "
                f"steps={steps} needs {steps}; pass a re-iterable (a list or DataLoader), a "
                "callable fn(step), or fewer steps"
            )

    def batch(self, step: int, seed: int) -> Batch:
        self.check(step + 1, seed)
        return self.batches[step]


class FromCallable(BatchSource):
    """Batches from ``fn(step)`` or ``fn(step, seed)``."""

    def __init__(self, fn: Callable[..., Batch]):
        self.fn = fn
        try:
            self.takes_seed = len(inspect.signature(fn).parameters) >= 2
        except (TypeError, ValueError):
            self.takes_seed = False

    def batch(self, step: int, seed: int) -> Batch:
        return self.fn(step, seed) if self.takes_seed else self.fn(step)


def as_source(data: Any, name: str = "train_data") -> BatchSource:
    """Turn user data into a :class:`BatchSource` (see the module doc for the rules)."""
    if isinstance(data, BatchSource):
        return data
    if data is None:
        raise HyperdiffError(f"hypergradient: {name} must be given (got None)")
    if isinstance(data, (Tensor, tuple, dict)):
        return FullBatch(data)
    if isinstance(data, list):
        return Sequence(data)
    if callable(data) and not hasattr(data, "__iter__"):
        return FromCallable(data)
    if isinstance(data, Iterator):
        return Recorded(data)
    if isinstance(data, Iterable):
        return Epochs(data)
    raise HyperdiffError(
        f"hypergradient: {name} must be a tensor, a tuple or dict of tensors, a list of "
        f"batches, an iterable, or a callable fn(step) (got {type(data).__name__})"
    )


def validation_batches(data: Any) -> list[Batch]:
    """Validation data as a list of batches: one batch, or every batch of a list/iterable."""
    if data is None:
        raise HyperdiffError("hypergradient: val_data must be given (got None)")
    if isinstance(data, (Tensor, tuple, dict)):
        return [data]
    if isinstance(data, Iterable):
        batches = list(data)
        if not batches:
            raise HyperdiffError("hypergradient: val_data must hold at least one batch (got 0)")
        return batches
    raise HyperdiffError(
        "hypergradient: val_data must be a tensor, a tuple or dict of tensors, or a list or "
        f"iterable of batches (got {type(data).__name__})"
    )
