"""Checks of the data itself, before any training: non-finite values and empty batches.

A NaN in the inputs or a batch with zero rows makes every loss NaN at step 0, which would
otherwise be reported as "inner training diverged; lower the learning rate". These checks say
what is wrong with which tensor instead. They look at every row where the data is held in
memory (one batch, a list of batches, :func:`hyperdiff.minibatches`), and at the first batch of
other sources (a ``DataLoader``, an iterator, ``fn(step)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.data.failures import first_row
from hyperdiff.errors import HyperdiffError
from hyperdiff.tree import leaves
from hyperdiff.typing import Batch


def tensors_in(batch: Batch, label: str = "batch") -> Iterator[tuple[str, Tensor]]:
    """``(label, tensor)`` for every tensor in a tensor, tuple/list or dict batch."""
    for path, leaf in leaves(batch, label):
        if isinstance(leaf, Tensor):
            yield path, leaf


def shapes_of(batch: Batch) -> str:
    """``"batch[0] (12, 3) float32, batch[1] (12,) int64"``: shapes and dtypes of a batch's
    tensors."""
    parts = [f"{label} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
             for label, t in tensors_in(batch)]
    return ", ".join(parts) if parts else type(batch).__name__


def check_batch(caller: str, name: str, batch: Batch) -> None:
    """Raise if a floating-point tensor of ``batch`` holds NaN or inf, or has zero rows."""
    for label, tensor in tensors_in(batch):
        where = label.replace("batch", name, 1)
        if tensor.dim() >= 1 and tensor.shape[0] == 0:
            raise HyperdiffError(
                f"{caller}: {name} must have at least one row (got {where} of shape "
                f"{tuple(tensor.shape)}); check how the data was split"
            )
        if tensor.is_floating_point() or tensor.is_complex():
            nonfinite = ~torch.isfinite(tensor)
            bad = int(nonfinite.sum())
            if bad:
                row = "" if tensor.dim() == 0 else f", first at row {first_row(nonfinite)}"
                raise HyperdiffError(
                    f"{caller}: {name} must be finite (got {bad} NaN or infinite entries of "
                    f"{tensor.numel()} in {where}{row}); clean or impute the data"
                )


def check_source(caller: str, name: str, source: Any, seed: int) -> None:
    """:func:`check_batch` over every in-memory batch of a train-data source, else over the
    batch of step 0."""
    from hyperdiff.engine.data import FullBatch, Minibatches, Recorded, Sequence

    if isinstance(source, Minibatches):
        held = [tuple(source.tensors)]  # every row, not only the rows of the first batches
    elif isinstance(source, FullBatch):
        held = [source.data]
    elif isinstance(source, (Sequence, Recorded)):
        held = list(source.batches)
    else:
        held = [source.batch(0, seed)]
    for i, batch in enumerate(held):
        check_batch(caller, name if len(held) == 1 else f"{name}[{i}]", batch)
