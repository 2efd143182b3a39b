"""One batch of a map-style ``Dataset`` read by index, torch seeded only where the data draws.

A :class:`BatchRequest` names a batch's samples (``indices``) and how the seed of each sample
derives: ``mix(*prefix, k)`` for the sample at position ``k`` of the batch, or
``mix(*prefix, index)`` (``by_index``). :class:`SeededBatches` reads it the way the user's own
``DataLoader`` would, in one go:

- a ``TensorDataset`` with the default ``collate_fn``: ``[t[indices] for t in tensors]``, the
  list that ``default_collate`` stacks from the rows (same values, dtypes and shapes);
- a dataset with ``__getitems__``: one call, then ``collate_fn``;
- any other: ``dataset[i]`` for each index, then ``collate_fn``.

torch's CPU generator is watched over the read (its state before, after the first sample and
after the batch: a 5 KB copy each). A dataset that did not draw from it gets the same batch as a
read seeded per sample, without one seed being set. One that did (random augmentation in
``__getitem__``) has the generator put back and the batch read again one sample at a time (by
``__getitem__``), with the generator seeded from each sample's seed, which makes the
augmentation replay in any process (a dataset with ``__getitems__`` is read again in one call,
the generator seeded from the batch's seed ``mix(*prefix, *indices)``, so that batch-level
augmentation such as a mixup stays); later batches of that reader go straight to the seeded
read (a worker process learns this on its own first batch). In the main process the generator
is left in the state it had (a worker's random state is its own). ``collate_fn`` runs after
the reads, as in a ``DataLoader``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate, get_worker_info

from hyperdiff.engine.data.failures import SampleError, indices_text, ragged, summary
from hyperdiff.engine.data.permutation import mix, mix_each
from hyperdiff.typing import Batch


@dataclass(frozen=True)
class BatchRequest:
    """The samples of one batch and the seed of each: ``mix(*prefix, position or index)``."""

    indices: list[int]
    prefix: tuple[int, ...]
    by_index: bool = False

    def sample_seeds(self) -> list[int]:
        """The seed of each sample, in the order of ``indices``."""
        return mix_each(self.prefix, self.indices if self.by_index
                        else list(range(len(self.indices))))


class SeededBatches(Dataset):
    """``self[request]``: the collated batch of a :class:`BatchRequest` (see the module doc).

    ``draws`` turns true once the dataset has been seen drawing from torch's CPU generator.
    """

    def __init__(self, dataset: Any, collate_fn: Any = default_collate):
        self.dataset, self.collate_fn = dataset, collate_fn
        self.tensors = (dataset.tensors if type(dataset) is TensorDataset
                        and collate_fn is default_collate else None)
        self.draws = False

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, request: BatchRequest) -> Batch:
        if self.tensors is not None:  # indexing a tensor draws nothing
            rows = torch.tensor(request.indices, dtype=torch.int64, device="cpu")
            return [t[rows.to(t.device)] for t in self.tensors]
        if not self.draws:
            samples = self._watched(request.indices)
            if samples is not None:
                return self.collate_fn(samples)
        return self.collate_fn(self.seeded(request))

    def _watched(self, indices: list[int]) -> list[Any] | None:
        """The samples read unseeded, or ``None`` (generator put back, ``draws`` set) when the
        dataset drew from torch's CPU generator: looked at after the first sample (so an
        augmenting dataset wastes one read) and after the rest."""
        generator = torch.default_generator
        before = generator.get_state()
        whole = bool(getattr(self.dataset, "__getitems__", None))
        samples: list[Any] = []
        try:
            for part in [indices] if whole else [indices[:1], indices[1:]]:
                samples += self._unseeded(part)
                if not torch.equal(before, generator.get_state()):
                    self.draws = True
                    generator.set_state(before)
                    return None
        except BaseException:  # a sample that failed may have drawn first
            generator.set_state(before)
            raise
        return samples

    def seeded(self, request: BatchRequest) -> list[Any]:
        """The samples, each read with torch's CPU generator seeded from its own seed; by one
        ``__getitems__`` call seeded from the batch's seed, ``mix(*prefix, *indices)``, where
        the dataset has one (its batch-level augmentation, a mixup, is kept)."""
        # the CPU generator only: torch.manual_seed would also reseed every accelerator's
        generator = torch.default_generator

        def read() -> list[Any]:
            if getattr(self.dataset, "__getitems__", None):
                generator.manual_seed(mix(*request.prefix, *request.indices))
                return self._unseeded(request.indices)
            pairs = zip(request.indices, request.sample_seeds(), strict=True)
            return [self._read(i, s) for i, s in pairs]

        if get_worker_info() is not None:  # a worker process: its random state is ours
            return read()
        saved = generator.get_state()
        try:
            return read()
        finally:
            generator.set_state(saved)

    def _unseeded(self, indices: list[int]) -> list[Any]:
        many = getattr(self.dataset, "__getitems__", None)
        if not many:
            try:
                return [self.dataset[i] for i in indices]
            except Exception:  # again one at a time, to name the sample that fails
                return [self._read(i) for i in indices]
        try:
            return list(many(indices))
        except Exception as err:
            raise SampleError(f"samples {indices_text(indices)} of {type(self.dataset).__name__}"
                              f" (its __getitems__) raised {summary(err)}") from err

    def _read(self, index: int, seed: int | None = None) -> Any:
        """``dataset[index]`` (after seeding torch's CPU generator with ``seed``, if given); its
        own exception becomes a :class:`SampleError` naming it."""
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        except Exception as err:
            raise SampleError(f"sample {index} of {type(self.dataset).__name__} raised "
                              f"{summary(err)}") from err


def as_is(batch: Batch) -> Batch:
    """The collate function of a loader over :class:`SeededBatches` (which collates itself)."""
    return batch


def reread_ragged(dataset: Any, request: BatchRequest) -> str:
    """Read the samples of a batch that failed again, here (seeded), and name the first whose
    shapes differ from the first's (:func:`.failures.ragged`), or ``""``."""
    try:
        samples = SeededBatches(dataset).seeded(request)
    except Exception:  # a sample that fails alone is named by its own error
        return ""
    return ragged(samples, request.indices)
