"""A ``DataLoader`` over a map-style ``Dataset``, read batch by batch with hyperdiff's shuffle.

hyperdiff owns the index order instead of the loader's sampler (so a ``generator=`` given to the
loader cannot make replays differ). With ``B`` the batch size, ``n = len(dataset)`` and
``K = n // B`` (``drop_last``) or ``ceil(n / B)`` batches per epoch, inner step ``t`` of seed
``s`` reads epoch ``e, j = divmod(t, K)`` and the samples

    pi_{s,e}(j B), ..., pi_{s,e}(min(j B + B, n) - 1)     (identity pi if not shuffled)

where ``pi_{s,e}`` is the pointwise permutation of :mod:`.permutation`: any batch can be rebuilt
on its own (the shuffle is evaluated for up to ``CHUNK`` samples of consecutive steps at once:
a Feistel evaluation costs about as much for 256 samples as for 8192). Batches are fetched by a
``DataLoader`` built from the user's (same ``collate_fn``, ``num_workers``, ``pin_memory``,
``worker_init_fn``, ...) whose sampler yields one :class:`~.fetch.BatchRequest` per step, from
the one asked for; it runs until the requested steps stop being consecutive, then a new one
starts where they resume. A batch is read in one go (:mod:`.fetch`: a ``TensorDataset`` by index
tensor, ``__getitems__`` where the dataset has it); only a dataset that draws from torch's random
state has each sample read with that state seeded from ``(s, t, position)``, so random
augmentation in ``__getitem__`` replays identically in the main process and in any worker.

Reads: the steps training asks for, plus what the workers prefetch (``num_workers *
prefetch_factor`` batches) ahead of a run that is abandoned; a request just behind a cached
batch (reversible's backward pass) reads the ``window`` steps up to it in one run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from hyperdiff.engine.data.failures import indices_text, user_code
from hyperdiff.engine.data.fetch import BatchRequest, SeededBatches, as_is, reread_ragged
from hyperdiff.engine.data.permutation import mix, permute
from hyperdiff.engine.data.streaming import Streamed
from hyperdiff.errors import HyperdiffError
from hyperdiff.typing import Batch

CPU = torch.device("cpu")
CHUNK = 32768  # samples whose shuffled positions are computed in one pass (256 KB)


def has_random_access(loader: Any) -> bool:
    """Whether ``loader`` is a ``DataLoader`` whose batches this module can rebuild: a
    map-style dataset, automatic batching, and a plain random (without replacement, one pass)
    or sequential sampler."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return False
    if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
        return False
    sampler = loader.sampler
    if type(sampler) is SequentialSampler:
        return True
    return (type(sampler) is RandomSampler and not sampler.replacement
            and sampler.num_samples == len(loader.dataset))  # type: ignore[arg-type]


@dataclass(frozen=True)
class IndexPlan:
    """Step -> sample indices (see the module doc)."""

    n: int
    batch_size: int
    drop_last: bool
    shuffle: bool

    @property
    def per_epoch(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def indices(self, step: int, seed: int) -> list[int]:
        """The dataset index of each sample of step ``step``."""
        return next(self.step_indices(step, step + 1, seed)).tolist()

    def step_indices(self, start: int, stop: int, seed: int) -> Iterator[Tensor]:
        """The indices of steps ``start, ..., stop - 1``, one int64 tensor per step, computed
        for up to :data:`CHUNK` samples of one epoch at a time (a quarter of that first: a run
        may be abandoned after a few steps)."""
        size, step = self.batch_size, start
        most = max(1, CHUNK // size)
        count = max(1, most // 4)
        while step < stop:
            epoch, j = divmod(step, self.per_epoch)
            take = min(stop - step, self.per_epoch - j, count)
            positions = torch.arange(j * size, min((j + take) * size, self.n), device=CPU)
            if self.shuffle:
                positions = permute(positions, self.n, mix(seed, epoch))
            yield from positions.split(size)
            step += take
            count = min(most, 2 * count)


class StepRequests:
    """Sampler: one :class:`~.fetch.BatchRequest` for each step ``start, ..., stop - 1``."""

    def __init__(self, plan: IndexPlan, seed: int, start: int, stop: int):
        self.plan, self.seed, self.start, self.stop = plan, seed, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[BatchRequest]:
        steps = self.plan.step_indices(self.start, self.stop, self.seed)
        for step, indices in enumerate(steps, self.start):
            yield BatchRequest(indices.tolist(), (self.seed, step))


@dataclass
class _Run:
    seed: int
    next_step: int
    stop: int
    iterator: Iterator[Batch]


LOADER_ADVICE = (
    "hyperdiff owns this loader's shuffle and seeds torch's generator for each sample, so what "
    "changed is the Dataset's own randomness or content: draw augmentation from torch "
    "(torch.rand, torch.randn_like; NumPy's and Python's global generators are not replayed), "
    "or keep the data fixed while the run reads it"
)


class LoaderStream(Streamed):
    """Lazy, random-access reading of a map-style ``DataLoader`` (see the module doc)."""

    def __init__(self, loader: DataLoader, name: str, window: int = 8):
        super().__init__(name, window, LOADER_ADVICE)
        self.loader = loader
        self.plan = IndexPlan(len(loader.dataset), int(loader.batch_size or 1),  # type: ignore[arg-type]
                              loader.drop_last, type(loader.sampler) is RandomSampler)
        if self.plan.per_epoch == 0:
            raise HyperdiffError(
                f"data: train_data {name} must yield at least one batch per epoch (got an empty "
                f"epoch: {self.plan.n} samples, batch_size={self.plan.batch_size}, drop_last="
                f"{self.plan.drop_last})"
            )
        self.batches = SeededBatches(loader.dataset, loader.collate_fn)
        self.run: _Run | None = None

    def epoch_length(self, seed: int) -> int:
        return self.plan.per_epoch

    def _fill(self, step: int, seed: int) -> None:
        run = self.run
        if run is None or run.seed != seed or not run.next_step <= step < run.stop or (
            step - run.next_step > self.window
        ):
            start = step
            if (seed, step + 1) in self.cache:  # walking backwards: read a window at once
                start = max(0, step - self.window + 1)
            run = None  # no reference left: _start releases the previous run's workers first
            run = self.run = self._start(seed, start, max(self.horizon, step + self.window))
        while run.next_step <= step:
            at = run.next_step
            with user_code(partial(self.where, at, seed), partial(self._ragged, at, seed)):
                batch = next(run.iterator)
            self._keep(seed, at, batch)
            run.next_step += 1

    def where(self, step: int, seed: int) -> str:
        indices = indices_text(self.plan.indices(step, seed))
        return (f"the batch of step {step} (seed {seed}, samples {indices}) of train_data "
                f"{self.name}")

    def sample_indices(self, step: int, seed: int) -> list[int] | None:
        return self.plan.indices(step, seed)

    def _ragged(self, step: int, seed: int, err: BaseException) -> str:
        """After a failed batch: which sample's shapes differ (read again, here), or ``""``."""
        return reread_ragged(self.loader.dataset,
                             BatchRequest(self.plan.indices(step, seed), (seed, step)))

    def _start(self, seed: int, start: int, stop: int) -> _Run:
        self.run = None  # drop the previous run's iterator (and its workers) first
        user = self.loader
        workers = user.num_workers
        options: dict[str, Any] = {"in_order": True} if hasattr(user, "in_order") else {}
        loader = DataLoader(
            self.batches,
            batch_size=None,  # the dataset reads and collates whole batches
            sampler=StepRequests(self.plan, seed, start, stop),
            num_workers=workers,
            collate_fn=as_is,
            pin_memory=user.pin_memory,
            timeout=user.timeout,
            worker_init_fn=user.worker_init_fn,
            multiprocessing_context=user.multiprocessing_context,
            generator=torch.Generator().manual_seed(mix(seed, start)),
            prefetch_factor=user.prefetch_factor if workers else None,
            pin_memory_device=user.pin_memory_device,
            **options,
        )
        return _Run(seed, start, stop, iter(loader))
