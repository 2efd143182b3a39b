"""The random state a user's iterable is read under: private generators, the global ones only
for an iterable that draws from them.

An epoch (or an evaluation pass) of a re-iterable has a :class:`PrivateRandom` seeded from its
key: a torch CPU state, a Python ``random`` state, a NumPy state and one ``torch.Generator``.
:class:`ReadRandomness` runs each piece of the user's code (``iter()``, each ``next()``) under it:

- first *lent*: the ``torch.Generator`` attributes of the loader, its sampler(s) and its dataset
  are swapped for the private generator, and a ``DataLoader`` without one is given a generator in
  the private torch state (its worker seeds come from there, as they came from the global state
  when it was swapped); the global generators stay the user's and are watched (their states
  compared before and after: torch's 5 KB, Python's and NumPy's 2.5 KB);
- once the iterable is seen drawing from a global generator (an augmentation, a sampler without
  a generator, ``random.shuffle``), the user's states are put back, :class:`DrewGlobal` is
  raised so that the caller re-reads the epoch from its start, and from then on the private
  states are made the global ones while the iterable's code runs (*swapped*), and the user's
  are restored after each call.

So an iterable that draws nothing gets exactly the batches it got when every call was swapped,
and the global generators are never touched for it; one that draws gets the same seeded
batches as before (its first epoch read twice up to the first draw).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from hyperdiff.engine.data.permutation import mix

T = TypeVar("T")


class DrewGlobal(Exception):  # noqa: N818 (a signal to re-read, not an error)
    """The iterable drew from a global generator while its states were the user's."""


class PrivateRandom:
    """A random state of its own (torch CPU, ``random``, NumPy and one ``torch.Generator``)."""

    def __init__(self, key: int):
        self.torch_state = torch.Generator().manual_seed(key).get_state()
        self.python_state = random.Random(key).getstate()
        self.numpy_state = np.random.RandomState(key % (1 << 32)).get_state()
        self.generator = torch.Generator().manual_seed(mix(key, 1))
        self.loader_generator = torch.Generator().manual_seed(key)  # the torch state, lent

    @contextmanager
    def lent(self, holders: list[Any], loader: DataLoader | None) -> Iterator[None]:
        """The private generator lent to the ``holders``' ``generator`` attributes, and the
        private torch state to ``loader`` (a ``DataLoader`` without a generator); the global
        generators untouched."""
        lent = [(holder, self.generator) for holder in holders]
        if loader is not None:
            lent.append((loader, self.loader_generator))
        originals = [holder.generator for holder, _ in lent]
        for holder, generator in lent:
            holder.generator = generator
        try:
            yield
        finally:
            for (holder, _), original in zip(lent, originals, strict=True):
                holder.generator = original

    @contextmanager
    def swapped(self, holders: list[Any]) -> Iterator[None]:
        """The private states made the global ones (and lent to the ``holders``) while active,
        the user's put back afterwards."""
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.set_rng_state(self.torch_state)
        random.setstate(self.python_state)
        np.random.set_state(self.numpy_state)
        try:
            with self.lent(holders, None):
                yield
        finally:
            self.torch_state = torch.get_rng_state()
            self.python_state = random.getstate()
            self.numpy_state = np.random.get_state()
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class ReadRandomness:
    """Runs an iterable's code lent, or swapped once it has drawn (see the module doc)."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.holders = _generator_holders(owner)
        self.loader = owner if isinstance(owner, DataLoader) and owner.generator is None else None
        self.draws = False  # has the iterable drawn from a global generator?

    def call(self, rng: PrivateRandom, fn: Callable[[], T]) -> T:
        """``fn()`` under ``rng``; raises :class:`DrewGlobal` (states put back) the first time
        ``fn`` draws from a global generator."""
        if self.draws:
            with rng.swapped(self.holders):
                return fn()
        before = _global_states()
        with rng.lent(self.holders, self.loader):
            try:
                result = fn()
            except BaseException as err:  # Ctrl-C still stops the read (states put back)
                if self._drew(before) and isinstance(err, Exception):
                    raise DrewGlobal from None
                raise
        if self._drew(before):
            raise DrewGlobal
        return result

    def _drew(self, before: tuple[Any, ...]) -> bool:
        """Whether the global states moved since ``before``; if so, put them back."""
        moved = untracked_draws(before[1:])
        if not torch.equal(before[0], torch.get_rng_state()):
            torch.set_rng_state(before[0])
            moved.append("torch's")
        self.draws = self.draws or bool(moved)
        return bool(moved)


def _global_states() -> tuple[Any, ...]:
    return torch.get_rng_state(), *untracked_states()


def untracked_states() -> tuple[Any, Any]:
    """The states of Python's ``random`` and NumPy's legacy ``np.random``: the global
    generators that torch's seeding (a loss's :func:`~hyperdiff.engine.models.replayed_rng`)
    does not reach."""
    return random.getstate(), np.random.get_state(legacy=True)


def untracked_draws(before: tuple[Any, Any]) -> list[str]:
    """The generators among :func:`untracked_states` that moved since ``before`` (each put back
    to its state in ``before``). NumPy's legacy state is (name, key array, position, has_gauss,
    cached_gaussian)."""
    py, legacy = before
    moved = []
    if random.getstate() != py:
        random.setstate(py)
        moved.append("Python's random")
    now: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    if now[2:] != legacy[2:] or not np.array_equal(now[1], legacy[1]):
        np.random.set_state(legacy)
        moved.append("NumPy's np.random")
    return moved


def _generator_holders(owner: Any) -> list[Any]:
    """Objects among ``owner``, its sampler(s) and dataset with a ``torch.Generator`` attribute."""
    batch_sampler = getattr(owner, "batch_sampler", None)
    candidates = [owner, getattr(owner, "sampler", None), batch_sampler,
                  getattr(batch_sampler, "sampler", None), getattr(owner, "dataset", None)]
    return [c for c in candidates
            if c is not None and isinstance(getattr(c, "generator", None), torch.Generator)]

