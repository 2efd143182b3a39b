"""``hd.given_splits`` whose splits are a ``Dataset``, a ``DataLoader`` or a generator function.

- ``train``: a ``DataLoader`` (or any source ``make_problem`` takes) is streamed lazily by
  :mod:`hyperdiff.engine.data`; a bare map-style ``Dataset`` is wrapped in
  ``DataLoader(dataset, batch_size=task batch_size, shuffle=True)`` (hyperdiff owns the shuffle).
- ``val`` and ``selection`` are read once, in batches, into memory: they are evaluated at every
  outer step (``val`` inside every hypergradient). Without ``selection``, a map-style ``val``
  (a ``Dataset`` or a ``DataLoader`` over one with a plain sampler) is cut by sample index:
  ``selection_fraction`` of its samples, stratified by integer labels when every batch has them
  (``batch[1]`` or ``batch["y"]``; this reads ``val`` once more).
- ``test`` stays lazy: an :class:`~hyperdiff.engine.data.evaluation.EvaluationSplit` read batch by
  batch at every report, never held whole.

A bare ``Dataset`` is read in batches of the task's ``batch_size`` (256 without one); pass a
``DataLoader`` to choose the batch size, ``collate_fn`` or ``num_workers`` of a split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from hyperdiff.app.tasks.splits import labels_needed, split_given_rows, stratify_labels
from hyperdiff.engine.data.evaluation import (
    DEFAULT_EVAL_BATCH,
    EvaluationSplit,
    evaluation_split,
    is_dataset_split,
    is_map_style,
    map_style_split,
)
from hyperdiff.engine.data.loader import has_random_access
from hyperdiff.errors import HyperdiffError
from hyperdiff.typing import Batch


def train_source(train: Any, batch_size: int | None, name: str) -> Any:
    """The train split as ``make_problem`` takes it: a map-style ``Dataset`` becomes a shuffled
    ``DataLoader`` of ``batch_size``; a ``DataLoader`` keeps its own batch size."""
    if isinstance(train, DataLoader):
        if batch_size is not None and batch_size != train.batch_size:
            raise HyperdiffError(
                f"{name}: batch_size must be None or the train DataLoader's batch_size "
                f"{train.batch_size} (got {batch_size}): the loader's batch size is used")
        return train
    if isinstance(train, IterableDataset):  # yields samples: batched as a DataLoader would
        if batch_size is None:
            raise HyperdiffError(
                f"{name}: batch_size must be given when given_splits(train=...) is an "
                f"IterableDataset (got None and {type(train).__name__}, which yields samples, "
                "not batches); or pass DataLoader(dataset, batch_size=...), or "
                "DataLoader(dataset, batch_size=None) for one that yields whole batches")
        return DataLoader(train, batch_size=batch_size)
    if not is_map_style(train):
        return train
    if batch_size is None:
        raise HyperdiffError(
            f"{name}: batch_size must be given when given_splits(train=...) is a Dataset (got "
            f"None and {type(train).__name__}); or pass DataLoader(dataset, batch_size=..., "
            "shuffle=True)")
    return DataLoader(train, batch_size=batch_size, shuffle=True)


def eval_batch_size(batch_size: int | None) -> int:
    return DEFAULT_EVAL_BATCH if batch_size is None else batch_size


def _map_style(data: Any, batch_size: int) -> tuple[Any, int, DataLoader | None] | None:
    """``(dataset, batch size, loader)`` of a split that can be cut by sample index."""
    if isinstance(data, DataLoader):
        return (data.dataset, int(data.batch_size or 1), data) if has_random_access(
            data) else None
    return (data, batch_size, None) if is_map_style(data) else None


def _labels(split: EvaluationSplit, stratify: bool | None) -> Tensor | None:
    """The labels of every sample of ``split`` in order, or ``None`` if a batch has none."""
    if stratify is False:
        return None
    parts = []
    for batch in split:
        labels = stratify_labels(batch, any_dtype=bool(stratify))
        if labels is None:
            return None
        parts.append(labels.detach().cpu())
    return torch.cat(parts)


def validation_and_selection(
    val: Any, selection: Any, *, name: str, selection_fraction: float, seed: int,
    stratify: bool | None, batch_size: int | None,
) -> tuple[list[Batch], list[Batch] | None]:
    """In-memory ``(val, selection)`` batches of a ``val`` that is a data set (see the module
    doc); ``selection`` is ``None`` when ``selection_fraction`` is 0 and none was given."""
    size = eval_batch_size(batch_size)
    if selection is not None:
        return (list(iter(evaluation_split("validation", val, batch_size=size))),
                selection_batches(selection, batch_size))
    if selection_fraction == 0:
        return list(iter(evaluation_split("validation", val, batch_size=size))), None
    cut = _map_style(val, size)
    if cut is None:
        raise HyperdiffError(
            f"{name}: given_splits(selection=...) must be given when val is not a map-style "
            f"Dataset or a DataLoader over one with a plain sampler (got {type(val).__name__}), "
            "or set task.selection_fraction = 0")
    dataset, size, like = cut
    # a loader's drop_last leaves out its own short last batch, once, before the cut: the rows
    # cut are the loader's full batches' (0..kept-1 in index order), each part read whole
    drop_last = like is not None and like.drop_last
    every = map_style_split("validation", dataset, batch_size=size, like=like,
                            drop_last=drop_last)
    kept = every.num_samples
    labels = _labels(every, stratify)
    if stratify and labels is None:
        raise labels_needed(name, given=True)
    val_rows, sel_rows = split_given_rows(kept, selection_fraction=selection_fraction,
                                          seed=seed, labels=labels)
    val_batches = list(map_style_split("validation", dataset, batch_size=size, rows=val_rows,
                                       like=like))
    if not sel_rows.numel():
        return val_batches, None
    return val_batches, list(map_style_split("selection", dataset, batch_size=size,
                                             rows=sel_rows, like=like))


def selection_batches(selection: Any, batch_size: int | None) -> Any:
    """A given ``selection``: a data set read once into a list of batches, else as it is."""
    if not is_dataset_split(selection):
        return selection
    return list(iter(evaluation_split("selection", selection,
                                         batch_size=eval_batch_size(batch_size))))


def test_split(test: Any, batch_size: int | None) -> EvaluationSplit:
    """The lazily read test split."""
    return evaluation_split("test", test, batch_size=eval_batch_size(batch_size))


def split_size(batches: Any, count: Any) -> int:
    """Samples of a split: ``num_samples`` of a lazy split, else ``count`` summed over its
    batches."""
    if isinstance(batches, EvaluationSplit):
        return batches.num_samples
    return sum(count(b) for b in batches)
