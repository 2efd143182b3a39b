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
from contextlib import ExitStack, contextmanager
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

    @contextmanager
    def lent(self, owner: Any) -> Iterator[None]:
        """The private generator lent to ``owner``'s generator attributes (a ``DataLoader``
        without one gets one in the private torch state); the global generators untouched."""
        with ExitStack() as stack:
            for holder in _generator_holders(owner):
                stack.enter_context(_swapped_generator(holder, self.generator))
            if isinstance(owner, DataLoader) and owner.generator is None:
                own = torch.Generator()
                own.set_state(self.torch_state)
                stack.enter_context(_swapped_generator(owner, own))
                stack.callback(lambda: setattr(self, "torch_state", own.get_state()))
            yield

    @contextmanager
    def swapped(self, owner: Any) -> Iterator[None]:
        """The private states made the global ones (and lent to ``owner``) while active."""
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.set_rng_state(self.torch_state)
        random.setstate(self.python_state)
        np.random.set_state(self.numpy_state)
        try:
            with ExitStack() as stack:
                for holder in _generator_holders(owner):
                    stack.enter_context(_swapped_generator(holder, self.generator))
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
        self.draws = False  # has the iterable drawn from a global generator?

    def call(self, rng: PrivateRandom, fn: Callable[[], T]) -> T:
        """``fn()`` under ``rng``; raises :class:`DrewGlobal` (states put back) the first time
        ``fn`` draws from a global generator."""
        if self.draws:
            with rng.swapped(self.owner):
                return fn()
        before = _global_states()
        with rng.lent(self.owner):
            try:
                result = fn()
            except BaseException:
                if self._drew(before):
                    raise DrewGlobal from None
                raise
        if self._drew(before):
            raise DrewGlobal
        return result

    def _drew(self, before: tuple[Any, ...]) -> bool:
        """Whether the global states moved since ``before``; if so, put them back."""
        if _same_states(before, _global_states()):
            return False
        torch.set_rng_state(before[0])
        random.setstate(before[1])
        np.random.set_state(before[2])
        self.draws = True
        return True


def _global_states() -> tuple[Any, ...]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _same_states(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return (torch.equal(a[0], b[0]) and a[1] == b[1]
            and all(np.array_equal(x, y) for x, y in zip(a[2], b[2], strict=True)))


def _generator_holders(owner: Any) -> list[Any]:
    """Objects among ``owner``, its sampler(s) and dataset with a ``torch.Generator`` attribute."""
    batch_sampler = getattr(owner, "batch_sampler", None)
    candidates = [owner, getattr(owner, "sampler", None), batch_sampler,
                  getattr(batch_sampler, "sampler", None), getattr(owner, "dataset", None)]
    return [c for c in candidates
            if c is not None and isinstance(getattr(c, "generator", None), torch.Generator)]


@contextmanager
def _swapped_generator(holder: Any, generator: torch.Generator) -> Iterator[None]:
    original = holder.generator
    holder.generator = generator
    try:
        yield
    finally:
        holder.generator = original
