"""In-memory batch sources: one full batch, a list, seeded minibatches, ``fn(step, seed)``, and
a recorded one-shot iterator.

Every hypergradient method replays the same training run (finite differences replay it 2k
times), so a source maps ``(step, seed)`` to a batch deterministically; streamed sources
(re-iterables, ``DataLoader``) are in :mod:`.streaming` and :mod:`.loader`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.data.failures import check_devices, check_finite, check_rows, user_code
from hyperdiff.engine.data.replay import ReplayLog, check_batch
from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.seeds import epoch_seed
from hyperdiff.typing import Batch


class BatchSource:
    """Base class: ``source.batch(step, seed)`` returns the batch of inner step ``step``."""

    fixed_batch = False
    """Every step reads the same rows (a full batch: the training gradient has no sampling
    noise); ``False`` where the source cannot tell."""

    def batch(self, step: int, seed: int) -> Batch:
        raise NotImplementedError

    def check(self, steps: int, seed: int) -> None:
        """Raise a clear error if fewer than ``steps`` batches are available."""

    def describe(self) -> str:
        """The data source's name in messages (its ``name``, else the class name)."""
        return str(getattr(self, "name", type(self).__name__))


class FullBatch(BatchSource):
    """The same batch at every step."""

    fixed_batch = True

    def __init__(self, data: Batch):
        self.data = check_batch(data, "data: train_data")

    def batch(self, step: int, seed: int) -> Batch:
        return self.data


class Sequence(BatchSource):
    """A fixed list of batches, cycled in order."""

    def __init__(self, batches: list[Batch]):
        if not batches:
            raise HyperdiffError("data: a list of batches must not be empty (got [])")
        for i, batch in enumerate(batches):
            check_batch(batch, f"data: train_data[{i}]")
        self.batches = batches
        self.fixed_batch = len(batches) == 1

    def batch(self, step: int, seed: int) -> Batch:
        return self.batches[step % len(self.batches)]


class Minibatches(BatchSource):
    """Random minibatches of ``tensors`` (all with the same first dimension), reshuffled every
    epoch from ``(seed, epoch)``; the last incomplete batch of an epoch is dropped."""

    def __init__(self, *tensors: Tensor, batch_size: int, shuffle: bool = True):
        if not tensors:
            raise HyperdiffError("minibatches: at least one tensor is required")
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor) or t.dim() == 0:
                raise HyperdiffError(
                    f"minibatches: tensors must be torch tensors with a first (row) dimension "
                    f"(got {type(t).__name__} {describe(t)} as argument {i}); convert with "
                    "torch.as_tensor"
                )
        if not isinstance(shuffle, bool):
            raise HyperdiffError(f"minibatches: shuffle must be True or False (got "
                                 f"{describe(shuffle)})")
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
        self.fixed_batch = batch_size == n  # every row at every step, only their order moves
        self._perm_cache: dict[tuple[int, int], Tensor] = {}

    def _permutation(self, seed: int, epoch: int) -> Tensor:
        key = (seed, epoch)
        if key not in self._perm_cache:
            n = self.tensors[0].shape[0]
            if self.shuffle:
                gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
                # a CPU generator's permutation; batch() moves the rows to the data's device
                self._perm_cache[key] = torch.randperm(n, generator=gen, device="cpu")
            else:
                self._perm_cache[key] = torch.arange(n, device="cpu")
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


class Recorded(BatchSource):
    """A one-shot iterator, recorded as it is consumed so that it can be replayed."""

    def __init__(self, iterator: Iterator[Batch]):
        self.iterator = iterator
        self.batches: list[Batch] = []
        self.exhausted = False

    def check(self, steps: int, seed: int) -> None:
        while len(self.batches) < steps and not self.exhausted:
            try:
                with user_code(lambda: f"batch {len(self.batches)} of the train_data iterator"):
                    batch = next(self.iterator)
            except StopIteration:
                self.exhausted = True
                break
            self.batches.append(
                check_batch(batch, f"data: batch {len(self.batches)} of the train_data iterator")
            )
        if len(self.batches) < steps:
            raise HyperdiffError(
                f"data: the train_data iterator ran out after {len(self.batches)} batches, but "
                f"steps={steps} needs {steps}; pass a re-iterable (a list or DataLoader), a "
                "callable fn(step), or fewer steps"
            )

    def batch(self, step: int, seed: int) -> Batch:
        self.check(step + 1, seed)
        return self.batches[step]


def seed_argument(fn: Callable[..., Any]) -> str | None:
    """How ``fn(step, ...)`` takes the training seed: ``"positional"`` (a second positional
    parameter without a default, or one named ``seed``), ``"keyword"`` (a keyword-only
    ``seed``), or None (``fn(step)``: a second parameter with a default, such as ``noise=0.0``,
    is the user's own knob and keeps its default).

    >>> seed_argument(lambda step, seed: 0), seed_argument(lambda step, noise=0.0: 0)
    ('positional', None)
    >>> seed_argument(lambda step, *, seed: 0), seed_argument(lambda step, seed=0: 0)
    ('keyword', 'positional')
    """
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(parameters) < 2 or parameters[0].kind not in positional:
        return None
    second = parameters[1]
    if second.kind in positional and (second.name == "seed"
                                      or second.default is inspect.Parameter.empty):
        return "positional"
    if any(p.name == "seed" and p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters):
        return "keyword"
    return None


class FromCallable(BatchSource):
    """Batches from ``fn(step)`` or ``fn(step, seed)``, verified to repeat on every call."""

    def __init__(self, fn: Callable[..., Batch], name: str = "function"):
        self.fn, self.name = fn, name
        self.seed_as = seed_argument(fn)
        self.takes_seed = self.seed_as is not None
        self.log = ReplayLog(name, "fn(step, seed) must return the same batch for the same "
                                   "arguments: draw any randomness from a generator seeded by "
                                   "(step, seed)")

    def where(self, step: int, seed: int) -> str:
        """The batch of ``step`` in messages."""
        call = {"positional": f"{self.name}({step}, {seed})",
                "keyword": f"{self.name}({step}, seed={seed})"}.get(str(self.seed_as),
                                                                   f"{self.name}({step})")
        return f"the batch of step {step} (seed {seed}), {call},"

    def batch(self, step: int, seed: int) -> Batch:
        with user_code(partial(self.where, step, seed)):
            if self.seed_as == "positional":
                batch = self.fn(step, seed)
            elif self.seed_as == "keyword":
                batch = self.fn(step, seed=seed)
            else:
                batch = self.fn(step)
        if (seed, step) not in self.log.prints:
            check_devices(partial(self.where, step, seed), batch)
            check_rows(partial(self.where, step, seed), batch)
            check_finite(partial(self.where, step, seed), batch)
        return self.log.check(seed, step, batch)


class Fed(BatchSource):
    """Batches handed over by a training loop outside hyperdiff (a Lightning ``Trainer``), by
    step: ``feed(step, batch)`` before any training reads step ``step``; ``forget(step)``
    drops the batches before it once no window will read them again."""

    def __init__(self, name: str = "fed batches"):
        self.name = name
        self.batches: dict[int, Batch] = {}

    def feed(self, step: int, batch: Batch) -> None:
        self.batches[step] = check_batch(batch, f"data: the batch of step {step} of {self.name}")

    def forget(self, step: int) -> None:
        for old in [s for s in self.batches if s < step]:
            del self.batches[old]

    def batch(self, step: int, seed: int) -> Batch:
        if step not in self.batches:
            raise HyperdiffError(f"data: step {step} must be one of the steps fed to {self.name} "
                                 f"(got a read of it; fed: {sorted(self.batches)})")
        return self.batches[step]
