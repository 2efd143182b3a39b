"""Evaluation splits read from a ``Dataset`` or ``DataLoader``: lazily, in batches, the same
batches on every pass, averaged by sample count.

A report evaluates the test split (and a task's other splits) after every final training, so a
split that is a data set is read batch by batch and never held whole. Each pass must see the
same samples, or two reports (the initial and the tuned values, a run and its resume) would
measure different things:

- a map-style ``Dataset`` (or a ``DataLoader`` over one with a sequential or plain random
  sampler) is read in index order ``0, ..., n-1`` in batches of ``B`` (the loader's batch size;
  ``batch_size`` for a bare ``Dataset``; a loader's ``drop_last`` drops the short last batch,
  samples ``B * (n // B), ..., n-1``), through a ``DataLoader`` with the user's
  ``collate_fn``, ``num_workers``, ...; a batch is read in one go (:mod:`.fetch`), and a
  dataset that draws from torch's random state has sample ``i`` read with that state seeded
  from ``i`` (random augmentation in ``__getitem__`` replays);
- any other re-iterable (a loader with a custom sampler, an ``IterableDataset``, a zero-argument
  generator function) is iterated once per pass with a private random state (the loader's
  ``generator``; torch's, Python's and NumPy's global ones only for data that draws from them,
  as :mod:`.streaming` does for training: :mod:`.random_state`).

The first pass fingerprints every batch; later passes are verified against it. A split's
metric is the sample-weighted mean of its batch values, ``sum_b n_b m_b / sum_b n_b``, with
``n_b`` the first dimension of the batch's first tensor (:func:`batch_rows`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from hyperdiff.engine.data.failures import check_finite, indices_text, named_batches
from hyperdiff.engine.data.fetch import BatchRequest, SeededBatches, as_is, reread_ragged
from hyperdiff.engine.data.loader import has_random_access
from hyperdiff.engine.data.permutation import mix
from hyperdiff.engine.data.random_state import DrewGlobal, PrivateRandom, ReadRandomness
from hyperdiff.engine.data.replay import check_batch, fingerprint
from hyperdiff.errors import HyperdiffError
from hyperdiff.tree import leaves, move
from hyperdiff.typing import Batch

EVAL_KEY = 0x5EED_E7A1  # the per-sample seeds of evaluation reads: mix(EVAL_KEY, index)
DEFAULT_EVAL_BATCH = 256


def batch_rows(batch: Batch) -> int:
    """Samples in a batch: the first dimension of its first tensor of dimension >= 1 (1 if
    there is none)."""
    for _, leaf in leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim():
            return int(leaf.shape[0])
    return 1


def sample_weights(batches: list[Batch]) -> list[float] | None:
    """``n_b / sum(n)`` per batch, or ``None`` when every batch has the same size (then the
    plain mean over batches is the sample mean, and callers keep it bit for bit)."""
    sizes = [batch_rows(b) for b in batches]
    if len(set(sizes)) <= 1:
        return None
    total = sum(sizes)
    return [n / total for n in sizes]


def is_dataset_split(data: Any) -> bool:
    """Whether ``data`` is a ``Dataset`` / ``DataLoader`` / generator function that
    :func:`evaluation_split` reads lazily (tensors and lists of batches are not)."""
    if isinstance(data, (DataLoader, Dataset)):
        return True
    return callable(data) and not hasattr(data, "__iter__") and not isinstance(data, Tensor)


def is_map_style(data: Any) -> bool:
    """A map-style ``Dataset`` (``len`` and ``[i]``), not an ``IterableDataset``."""
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(
        data, "__len__")


class EvaluationSplit:
    """A split read lazily in batches; iterating it yields the same batches on every pass.

    ``len(split)`` is the number of batches, :attr:`num_samples` the number of samples (both
    known without reading for a map-style source; learned on the first pass otherwise).
    """

    def __init__(self, name: str, passes: Callable[[], Iterator[Batch]],
                 num_batches: int | None = None, num_samples: int | None = None,
                 transform: Callable[[Batch], Batch] | None = None,
                 samples_of: Callable[[int], list[int]] | None = None,
                 explain: Callable[[int, BaseException], str] | None = None):
        self.name, self._passes, self.transform = name, passes, transform
        self._num_batches, self._num_samples = num_batches, num_samples
        self._prints: list[bytes] | None = None
        self.samples_of = samples_of  # batch j -> the dataset index of each of its rows
        self.explain = explain  # (batch j, its error) -> which sample is ragged, or ""

    def where(self, j: int) -> str:
        """Batch ``j`` in messages."""
        samples = "" if self.samples_of is None else (
            f" (samples {indices_text(self.samples_of(j))})")
        return f"batch {j}{samples} of the {self.name} split"

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None
           ) -> EvaluationSplit:
        """The same split with every batch moved to ``device`` (floating tensors cast to
        ``dtype``) as it is read (``hyperdiff run --device``)."""
        def moved(batch: Batch) -> Batch:
            return move(batch if self.transform is None else self.transform(batch), device, dtype)

        return EvaluationSplit(self.name, self._passes, self._num_batches, self._num_samples,
                               moved, self.samples_of, self.explain)

    def __iter__(self) -> Iterator[Batch]:
        prints: list[bytes] = []
        samples = 0
        for j, batch in enumerate(named_batches(self._passes, self.where, self.explain)):
            check_batch(batch, f"data: batch {j} of the {self.name} split")
            if self._prints is None:  # the first pass: is the data finite?
                check_finite(partial(self.where, j), batch,
                             None if self.samples_of is None else partial(self.samples_of, j))
            digest = fingerprint(batch)
            if self._prints is not None and (j >= len(self._prints) or
                                             self._prints[j] != digest):
                raise self._changed(f"batch {j} differs from the first pass")
            prints.append(digest)
            samples += batch_rows(batch)
            yield batch if self.transform is None else self.transform(batch)
        if not prints:
            raise HyperdiffError(f"data: the {self.name} split must hold at least one batch "
                                 "(got an empty pass)")
        if self._prints is None:
            self._prints, self._num_batches, self._num_samples = prints, len(prints), samples
        elif len(prints) != len(self._prints):
            raise self._changed(f"{len(prints)} batches, {len(self._prints)} the first time")

    def __len__(self) -> int:
        if self._num_batches is None:
            for _ in self:
                pass
        assert self._num_batches is not None
        return self._num_batches

    @property
    def num_samples(self) -> int:
        if self._num_samples is None:
            len(self)
        assert self._num_samples is not None
        return self._num_samples

    def _changed(self, what: str) -> HyperdiffError:
        return HyperdiffError(
            f"data: the {self.name} split must yield the same batches on every pass (got {what}), "
            "or two reports would measure different data; draw any randomness from torch's "
            "random state (seeded per sample by hyperdiff) or make the split deterministic")


class _IndexBatches:
    """Sampler: one :class:`~.fetch.BatchRequest` per consecutive chunk of ``rows``, each
    sample seeded from ``mix(EVAL_KEY, index)``."""

    def __init__(self, rows: Tensor | None, n: int, batch_size: int):
        self.rows, self.n, self.batch_size = rows, n, batch_size

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[BatchRequest]:
        for start in range(0, self.n, self.batch_size):
            stop = min(start + self.batch_size, self.n)
            chunk = (list(range(start, stop)) if self.rows is None
                     else self.rows[start:stop].tolist())
            yield BatchRequest(chunk, (EVAL_KEY,), by_index=True)


def map_style_split(name: str, dataset: Any, *, batch_size: int, rows: Tensor | None = None,
                    like: DataLoader | None = None, drop_last: bool = False) -> EvaluationSplit:
    """The samples ``rows`` (default: all) of a map-style ``dataset`` in index order, in batches
    of ``batch_size``, fetched by a ``DataLoader`` with ``like``'s options; ``drop_last``: without
    the last batch when it is short, as a ``DataLoader(drop_last=True)`` drops it."""
    n = len(dataset) if rows is None else int(rows.numel())
    if n == 0:
        raise HyperdiffError(f"data: the {name} split must hold at least one sample (got an "
                             "empty data set)")
    if drop_last:
        if n < batch_size:
            raise HyperdiffError(
                f"data: the {name} split must hold at least one full batch of the DataLoader's "
                f"batch_size {batch_size} with drop_last=True (got {n} samples, so the loader "
                f"yields no batch); pass drop_last=False or a batch_size of at most {n}")
        n -= n % batch_size
        rows = None if rows is None else rows[:n]

    batches = SeededBatches(dataset, default_collate if like is None else like.collate_fn)

    def passes() -> Iterator[Batch]:
        options: dict[str, Any] = {}
        if like is not None:
            workers = like.num_workers
            options = dict(num_workers=workers,
                           pin_memory=like.pin_memory, timeout=like.timeout,
                           worker_init_fn=like.worker_init_fn,
                           multiprocessing_context=like.multiprocessing_context,
                           prefetch_factor=like.prefetch_factor if workers else None,
                           pin_memory_device=like.pin_memory_device)
            if hasattr(like, "in_order"):
                options["in_order"] = True
        loader = DataLoader(batches, batch_size=None, sampler=_IndexBatches(rows, n, batch_size),
                            collate_fn=as_is, generator=torch.Generator().manual_seed(EVAL_KEY),
                            **options)
        return iter(loader)

    def samples_of(j: int) -> list[int]:
        chunk = slice(j * batch_size, min((j + 1) * batch_size, n))
        return list(range(chunk.start, chunk.stop)) if rows is None else rows[chunk].tolist()

    def explain(j: int, err: BaseException) -> str:
        return reread_ragged(dataset, BatchRequest(samples_of(j), (EVAL_KEY,), by_index=True))

    return EvaluationSplit(name, passes, num_batches=-(-n // batch_size), num_samples=n,
                           samples_of=samples_of, explain=explain)


def iterable_split(name: str, data: Any) -> EvaluationSplit:
    """A re-iterable or zero-argument generator function, one iteration per pass with a
    private random state (:mod:`.random_state`)."""
    factory = callable(data) and not hasattr(data, "__iter__")
    randomness = ReadRandomness(data)

    def passes() -> Iterator[Batch]:
        yielded = 0  # batches of this pass given out
        while True:
            rng = PrivateRandom(mix(EVAL_KEY, 1))
            try:
                iterator = randomness.call(rng, lambda: iter(data() if factory else data))
                for j in itertools.count():
                    try:
                        batch = randomness.call(rng, partial(next, iterator))
                    except StopIteration:
                        return
                    if j >= yielded:
                        yielded += 1
                        yield batch
            except DrewGlobal:  # it draws from the global generators: the pass again, swapped
                continue

    return EvaluationSplit(name, passes)


def evaluation_split(name: str, data: Any, *, batch_size: int = DEFAULT_EVAL_BATCH
                     ) -> EvaluationSplit:
    """A lazily read split from a ``DataLoader``, a ``Dataset`` (map-style: in batches of
    ``batch_size``; iterable: batched by a ``DataLoader``) or a generator function.

    Raises:
        HyperdiffError: ``data`` is none of these.
    """
    if isinstance(data, DataLoader):
        if has_random_access(data):
            return map_style_split(name, data.dataset, batch_size=int(data.batch_size or 1),
                                   like=data, drop_last=data.drop_last)
        return iterable_split(name, data)
    if is_map_style(data):
        return map_style_split(name, data, batch_size=batch_size)
    if isinstance(data, IterableDataset):
        return iterable_split(name, DataLoader(data, batch_size=batch_size))
    if isinstance(data, Iterable) or (callable(data) and not isinstance(data, Tensor)):
        return iterable_split(name, data)
    raise HyperdiffError(f"data: the {name} split must be a Dataset, a DataLoader or a "
                         f"function returning an iterator (got {type(data).__name__})")
