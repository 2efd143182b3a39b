"""Replay verification: the batch of ``(seed, step)`` must be the same every time it is read.

Every hypergradient method replays training (checkpointed segments, reversible's backward
pass, finite differences' 2k trainings, multi-seed runs); a source that yields a different
batch on a re-read silently corrupts the hypergradient. :class:`ReplayLog` records a
fingerprint of each batch the first time ``(seed, step)`` is read and compares it on every
re-read; a difference raises :class:`~hyperdiff.HyperdiffError` naming the source.

The fingerprint is a 128-bit BLAKE2b digest of the batch's structure and, for every tensor, its
dtype, shape and bytes (tensors of up to ``FULL_ELEMENTS`` elements completely; larger ones at
``FULL_ELEMENTS`` evenly spaced elements plus their float64 sum).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError
from hyperdiff.tree import leaves
from hyperdiff.typing import Batch

FULL_ELEMENTS = 1 << 20
SCALARS = (int, float, complex, str, bytes, bool, type(None))


def check_batch(batch: Batch, where: str) -> Batch:
    """Return ``batch`` if it holds at least one tensor, else raise (``where`` names it)."""
    if isinstance(batch, (str, bytes, bytearray)) or not any(
        isinstance(leaf, Tensor) for _, leaf in leaves(batch)
    ):
        raise HyperdiffError(
            f"{where} must be a tensor or a tuple/list/dict of tensors (got "
            f"{type(batch).__name__} {_short(batch)}); convert the data to tensors, e.g. with "
            "torch.utils.data.default_collate"
        )
    return batch


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _tensor_bytes(t: Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    if flat.numel() > FULL_ELEMENTS:
        total = flat.double().sum() if not flat.is_complex() else flat.abs().double().sum()
        stride = -(-flat.numel() // FULL_ELEMENTS)
        flat = torch.cat([flat[::stride], total.to(flat.dtype).reshape(1)])
    return flat.cpu().contiguous().view(torch.uint8).numpy().tobytes()


def array_leaf(leaf: Any) -> Tensor | None:
    """A NumPy array or scalar in a batch (what a ``collate_fn`` may leave unconverted) as a
    tensor of its values, so that fingerprints and finiteness checks see them; None for
    anything else (tensors included) and for arrays of Python objects.

    >>> import numpy as np
    >>> array_leaf(np.array([1.5, np.nan])), array_leaf("text")
    (tensor([1.5000,    nan], dtype=torch.float64), None)
    """
    if type(leaf).__module__ != "numpy" or not hasattr(leaf, "__array__"):
        return None
    array = leaf.__array__()
    if array.dtype.hasobject:
        return None
    return torch.from_numpy(array.copy())


def fingerprint(batch: Batch) -> bytes:
    """A 16-byte digest that changes when the batch's structure or any tensor value changes
    (NumPy arrays and scalars in it are read as tensors)."""
    digest = hashlib.blake2b(digest_size=16)
    for path, leaf in leaves(batch):
        digest.update(path.encode())
        leaf = as_tensor if (as_tensor := array_leaf(leaf)) is not None else leaf
        if isinstance(leaf, Tensor):
            digest.update(f"{leaf.dtype}{tuple(leaf.shape)}".encode())
            digest.update(_tensor_bytes(leaf))
        elif isinstance(leaf, SCALARS):
            digest.update(repr(leaf).encode())
        else:
            digest.update(type(leaf).__qualname__.encode())
    return digest.digest()


class ReplayLog:
    """Fingerprints of the batches read so far, keyed by ``(seed, step)``."""

    def __init__(self, source: str, advice: str):
        self.source, self.advice = source, advice
        self.prints: dict[tuple[int, int], bytes] = {}

    def check(self, seed: int, step: int, batch: Batch) -> Batch:
        """Record the batch of ``(seed, step)`` or verify it against the first read."""
        check_batch(batch, f"data: the batch of step {step} from train_data {self.source}")
        digest = fingerprint(batch)
        first = self.prints.setdefault((seed, step), digest)
        if first != digest:
            raise HyperdiffError(
                f"data: train_data {self.source} must yield the same batch every time step "
                f"{step} (seed {seed}) is replayed (got a different batch on a re-read, so the "
                f"hypergradient would be wrong); {self.advice}"
            )
        return batch

    def check_epoch(self, seed: int, epoch: int, first: int, again: int) -> None:
        """Raise if epoch ``epoch`` had ``again`` batches on a re-read but ``first`` before."""
        if first != again:
            raise HyperdiffError(
                f"data: train_data {self.source} must yield the same number of batches in "
                f"every replay of epoch {epoch} (seed {seed}) (got {again}, {first} the first "
                f"time); {self.advice}"
            )
