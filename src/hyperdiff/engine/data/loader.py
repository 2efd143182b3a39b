"""A ``DataLoader`` over a map-style ``Dataset``, read batch by batch with hyperdiff's shuffle.

hyperdiff owns the index order instead of the loader's sampler (so a ``generator=`` given to the
loader cannot make replays differ). With ``B`` the batch size, ``n = len(dataset)`` and
``K = n // B`` (``drop_last``) or ``ceil(n / B)`` batches per epoch, inner step ``t`` of seed
``s`` reads epoch ``e, j = divmod(t, K)`` and the samples

    pi_{s,e}(j B), ..., pi_{s,e}(min(j B + B, n) - 1)     (identity pi if not shuffled)

where ``pi_{s,e}`` is the pointwise permutation of :mod:`.permutation`: any batch can be rebuilt
on its own. Samples are fetched by a ``DataLoader`` built from the user's (same ``collate_fn``,
``num_workers``, ``pin_memory``, ``worker_init_fn``, ...) whose batch sampler yields the index
lists of consecutive steps from the one asked for; it runs until the requested steps stop being
consecutive, then a new one starts where they resume. Each sample is fetched with torch's random
state seeded from ``(s, t, position)``, so random augmentation in ``__getitem__`` replays
identically in the main process and in any worker.

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
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    get_worker_info,
)

from hyperdiff.engine.data.failures import SampleError, indices_text, ragged, summary, user_code
from hyperdiff.engine.data.permutation import mix, permute
from hyperdiff.engine.data.streaming import Streamed
from hyperdiff.errors import HyperdiffError
from hyperdiff.typing import Batch

CPU = torch.device("cpu")


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
        epoch, j = divmod(step, self.per_epoch)
        stop = min((j + 1) * self.batch_size, self.n)
        positions = torch.arange(j * self.batch_size, stop, device=CPU)
        if self.shuffle:
            positions = permute(positions, self.n, mix(seed, epoch))
        return positions.tolist()


class StepIndices:
    """Batch sampler: ``[(index, sample_seed), ...]`` for steps ``start, ..., stop - 1``."""

    def __init__(self, plan: IndexPlan, seed: int, start: int, stop: int):
        self.plan, self.seed, self.start, self.stop = plan, seed, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            indices = self.plan.indices(step, self.seed)
            yield [(i, mix(self.seed, step, k)) for k, i in enumerate(indices)]


class SeededItems(Dataset):
    """``dataset[index]`` with torch's CPU random state seeded from the sample's seed."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, sample_seed = item
        # the CPU generator only: torch.manual_seed would also reseed every accelerator's
        # generator (fork_rng(devices=[]) does not restore those) at ~60x the cost per sample
        if get_worker_info() is not None:  # a worker process: its random state is ours
            torch.default_generator.manual_seed(sample_seed)
            return self._read(index)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)
            return self._read(index)

    def _read(self, index: int) -> Any:
        """``dataset[index]``; its own exception becomes a :class:`SampleError` naming it."""
        try:
            return self.dataset[index]
        except Exception as err:
            raise SampleError(f"sample {index} of {type(self.dataset).__name__} raised "
                              f"{summary(err)}") from err


def reread_ragged(dataset: Any, items: list[tuple[int, int]]) -> str:
    """Read the ``(index, sample_seed)`` samples of a batch that failed again, here, and name
    the first whose shapes differ from the first's (:func:`.failures.ragged`), or ``""``."""
    seeded = SeededItems(dataset)
    try:
        samples = [seeded[item] for item in items]
    except Exception:  # a sample that fails alone is named by its own error
        return ""
    return ragged(samples, [index for index, _ in items])


@dataclass
class _Run:
    seed: int
    next_step: int
    stop: int
    iterator: Iterator[Batch]


class LoaderStream(Streamed):
    """Lazy, random-access reading of a map-style ``DataLoader`` (see the module doc)."""

    def __init__(self, loader: DataLoader, name: str, window: int = 8):
        super().__init__(name, window)
        self.loader = loader
        self.plan = IndexPlan(len(loader.dataset), int(loader.batch_size or 1),  # type: ignore[arg-type]
                              loader.drop_last, type(loader.sampler) is RandomSampler)
        if self.plan.per_epoch == 0:
            raise HyperdiffError(
                f"data: train_data {name} must yield at least one batch per epoch (got an empty "
                f"epoch: {self.plan.n} samples, batch_size={self.plan.batch_size}, drop_last="
                f"{self.plan.drop_last})"
            )
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
        indices = self.plan.indices(step, seed)
        return reread_ragged(self.loader.dataset,
                             [(i, mix(seed, step, k)) for k, i in enumerate(indices)])

    def _start(self, seed: int, start: int, stop: int) -> _Run:
        self.run = None  # drop the previous run's iterator (and its workers) first
        user = self.loader
        workers = user.num_workers
        options: dict[str, Any] = {"in_order": True} if hasattr(user, "in_order") else {}
        loader = DataLoader(
            SeededItems(user.dataset),
            batch_sampler=StepIndices(self.plan, seed, start, stop),
            num_workers=workers,
            collate_fn=user.collate_fn,
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
