"""Fingerprints of a data split, so that a resumed run can tell whether its data changed.

A fingerprint is a small JSON-able dict::

    {"kind": "batch" | "items" | "value" | "iterable", "type": "TensorDataset", "length": n,
     "fields": "(float32[5], int64[])", "sampled": k, "sha256": "<hex>"}

- ``batch`` (a tensor, or a tuple / dict of tensors sharing their first dimension, held in
  memory): ``length`` is the number of rows, ``fields`` the dtype and full shape of each
  tensor; the sha256 covers every byte when the batch holds at most :data:`WHOLE_BYTES`, else
  the rows of :func:`sample_indices`.
- ``items`` (a map-style ``Dataset``, a ``DataLoader`` over one, a list of batches): ``length``
  is ``len``, ``fields`` the dtypes and shapes of item 0, and the sha256 covers the index and
  content of the items at :func:`sample_indices` (every item when there are at most
  :data:`SAMPLE` of them). Items are read with torch's, Python's and NumPy's random states
  seeded and restored afterwards, so that augmentation in ``__getitem__`` neither changes the
  hash nor the run.
- ``value`` (a tuple or dict batch whose entries are not all tensors of one length): the
  dtypes and shapes of its tensors and a digest of its whole content.
- ``iterable`` (an ``IterableDataset``, a generator function): only the type is recorded;
  reading it could consume it, so its content is not verified.

Hashing by index means that permuting rows changes the hash (unless the permutation fixes every
sampled index), as do an edited or a dropped row among those hashed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from hyperdiff.engine.data.evaluation import is_map_style
from hyperdiff.engine.data.failures import user_code
from hyperdiff.engine.data.replay import fingerprint as item_digest

SAMPLE = 64
"""Items (or rows of a large batch) hashed per split: the first, the last and a seeded draw."""
WHOLE_BYTES = 1 << 26
"""An in-memory batch up to this size (64 MiB) is hashed whole."""
SEED = 0


def sample_indices(length: int, k: int = SAMPLE, seed: int = SEED) -> list[int]:
    """``min(k, length)`` sorted indices in ``[0, length)``: all of them when ``length <= k``,
    else 0, ``length - 1`` and ``k - 2`` others, the j-th draw being
    ``1 + sha256(f"{seed}:{j}") mod (length - 2)`` (repeats skipped). sha256 rather than a
    torch or Python generator: the sample must not change when either is upgraded between a
    run's start and its resume.

    >>> drawn = sample_indices(100)
    >>> sample_indices(3), len(drawn), drawn[0], drawn[-1], len(sample_indices(10**12))
    ([0, 1, 2], 64, 0, 99, 64)
    """
    if length <= k:
        return list(range(length))
    chosen, draw = {0, length - 1}, 0
    while len(chosen) < k:
        word = hashlib.sha256(f"{seed}:{draw}".encode()).digest()
        chosen.add(1 + int.from_bytes(word[:8], "big") % (length - 2))
        draw += 1
    return sorted(chosen)


def split_fingerprint(data: Any) -> dict[str, Any]:
    """The fingerprint of one split (see the module doc); ``{}`` for ``None``."""
    if data is None:
        return {}
    tensors = _batch_tensors(data)
    if tensors is not None:
        return _batch_fingerprint(data, tensors)
    if isinstance(data, DataLoader):
        inner = data.dataset
        print_ = split_fingerprint(inner) if is_map_style(inner) else _iterable(inner)
        return {**print_, "type": f"DataLoader({print_['type']})",
                "batch_size": data.batch_size, "drop_last": data.drop_last,
                "sampler": _name(data.batch_sampler if data.batch_size is None
                                 or type(data.batch_sampler).__name__ != "BatchSampler"
                                 else data.sampler),
                "collate_fn": _name(data.collate_fn),
                **({"evaluates_drop_last": True} if data.drop_last else {})}
    if is_map_style(data) or isinstance(data, list):
        return _items_fingerprint(data)
    if isinstance(data, (tuple, Mapping)):  # a batch with entries other than row tensors
        return {"kind": "value", "type": type(data).__name__, "fields": _fields(data),
                "sha256": item_digest(data).hex()}
    return _iterable(data)


def fingerprint_changes(split: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints of ``split``, one phrase each (``[]``: none)."""
    if not old and not new:
        return []
    if not old or not new:
        return [f"split {split!r}: {_what(old) if old else 'absent'} at the start, "
                f"{_what(new) if new else 'absent'} now"]
    diffs = []
    recorded_later = ("sampler", "collate_fn")  # absent from fingerprints before 7 Dec
    for key, noun in (("type", "type"), ("length", "length"), ("fields", "fields"),
                      ("batch_size", "DataLoader batch_size"), ("drop_last", "drop_last"),
                      ("sampler", "DataLoader sampler"), ("collate_fn", "DataLoader collate_fn")):
        if key in recorded_later and key not in old:
            continue
        if old.get(key) != new.get(key):
            diffs.append(f"split {split!r}: {noun} {old.get(key)} at the start, "
                         f"{new.get(key)} now")
    if (split in EVALUATED and new.get("evaluates_drop_last") and old.get("drop_last")
            and not old.get("evaluates_drop_last")):  # a run started before s42
        diffs.append(f"split {split!r}: a DataLoader with drop_last=True, whose short last "
                     "batch this run's steps so far evaluated (hyperdiff read every row of an "
                     "evaluation split then) and now leaves out, as the loader does")
    if not diffs and old.get("sha256") != new.get("sha256"):
        hashed = ("every row" if old.get("sampled") == old.get("length")
                  else f"{old.get('sampled')} sampled items by index")
        diffs.append(f"split {split!r}: its content changed (same length and fields, but the "
                     f"sha256 of {hashed} differs: an item was edited or the items were "
                     "reordered)")
    return diffs


EVALUATED = ("val", "selection")  # splits a resumed run's steps evaluate (not train, test)


# ---------------------------------------------------------------------- internals
def _what(fingerprint: Mapping[str, Any]) -> str:
    length = fingerprint.get("length")
    return f"{fingerprint.get('type')}" + ("" if length is None else f" of length {length}")


def _batch_tensors(data: Any) -> list[Tensor] | None:
    """The tensors of an in-memory batch sharing their first dimension, else ``None``."""
    values = (list(data.values()) if isinstance(data, Mapping)
              else list(data) if isinstance(data, tuple) else [data])
    if not values or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in values):
        return None
    return values if len({int(t.shape[0]) for t in values}) == 1 else None


def _batch_fingerprint(data: Any, tensors: list[Tensor]) -> dict[str, Any]:
    rows = int(tensors[0].shape[0])
    whole = sum(t.numel() * t.element_size() for t in tensors) <= WHOLE_BYTES
    index = None if whole else torch.tensor(sample_indices(rows), device=tensors[0].device)
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        part = t if index is None else t[index.to(t.device)]
        digest.update(_bytes(part))
    sampled = rows if index is None else int(index.numel())
    return {"kind": "batch", "type": type(data).__name__, "length": rows,
            "fields": _fields(_first_row(data)), "sampled": sampled,
            "sha256": digest.hexdigest()}


def _items_fingerprint(data: Any) -> dict[str, Any]:
    length = len(data)
    indices = sample_indices(length)
    digest = hashlib.sha256()
    fields = "none"
    with _seeded_random():
        for i in indices:
            with user_code(partial(_sample_name, data, i)):  # the user's __getitem__
                item = _numpy_to_tensors(data[i])
            if i == 0:
                fields = _fields(item)
            digest.update(f"{i}:".encode())
            digest.update(item_digest(item))
    return {"kind": "items", "type": type(data).__name__, "length": length, "fields": fields,
            "sampled": len(indices), "sha256": digest.hexdigest()}


def _sample_name(data: Any, index: int) -> str:
    return f"sample {index} of {type(data).__name__} (read to fingerprint the run's data)"


def _name(obj: Any) -> str | None:
    """The qualified name of a function or of an object's class (a sampler, a collate_fn);
    not its module, whose name for a task file holds the file's path."""
    if obj is None:
        return None
    return str(getattr(obj, "__qualname__", type(obj).__qualname__))


def _iterable(data: Any) -> dict[str, Any]:
    name = getattr(data, "__qualname__", None) if callable(data) else None
    return {"kind": "iterable", "type": name or type(data).__name__}


def _first_row(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: v[0] for k, v in data.items()}
    return tuple(t[0] for t in data) if isinstance(data, tuple) else data[0]


def _fields(item: Any) -> str:
    """``"(float32[5], int64[])"``: dtype and shape of each tensor of ``item``."""
    if isinstance(item, Tensor):
        return f"{str(item.dtype).removeprefix('torch.')}{list(item.shape)}"
    if isinstance(item, Mapping):
        return "{" + ", ".join(f"{k}: {_fields(v)}" for k, v in item.items()) + "}"
    if isinstance(item, (list, tuple)):
        return "(" + ", ".join(_fields(v) for v in item) + ")"
    return type(item).__name__


def _numpy_to_tensors(item: Any) -> Any:
    """``item`` with its arrays as tensors: NumPy arrays and scalars, and anything NumPy reads
    as an array (a PIL image), so that the digest sees their values, not their type alone."""
    if isinstance(item, (np.ndarray, np.generic)) or (
            not isinstance(item, (Tensor, str, bytes, Mapping, list, tuple))
            and (hasattr(item, "__array__") or hasattr(item, "__array_interface__"))):
        array = np.asarray(item)
        if array.dtype != object:
            return torch.from_numpy(np.ascontiguousarray(array))
    if isinstance(item, Mapping):
        return {k: _numpy_to_tensors(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [_numpy_to_tensors(v) for v in item]
    return item


def _bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@contextmanager
def _seeded_random() -> Iterator[None]:
    """Seed torch's, Python's and NumPy's global random states for the block, then restore
    them (a dataset's augmentation must neither change the hash nor the run's draws)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        random.seed(SEED)
        np.random.seed(SEED)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
