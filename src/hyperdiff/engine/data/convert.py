"""What users pass as data, turned into a :class:`~hyperdiff.engine.data.BatchSource`.

:func:`as_source` accepts:

- a tensor, a tuple of tensors or a dict of tensors: one full batch, used at every step;
- a list: a sequence of batches, cycled in order;
- a ``DataLoader`` over a map-style ``Dataset`` (random or sequential sampler): read lazily,
  batch by batch, with hyperdiff's own seeded shuffle (:mod:`.loader`);
- any other re-iterable (an ``IterableDataset`` or its ``DataLoader``, a loader with a custom
  sampler, ...) or a zero-argument function returning a fresh iterator (a generator function):
  read lazily, epoch after epoch, under a random state seeded from ``(seed, epoch)``
  (:mod:`.streaming`);
- a one-shot iterator: recorded as it is consumed, an error if it runs out before ``steps``;
- a function ``fn(step)`` or ``fn(step, seed)``, or a :class:`BatchSource`.

Every streamed or computed batch is fingerprinted the first time ``(seed, step)`` is read and
verified on every re-read (:mod:`.replay`): a replay that differs raises.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from hyperdiff.engine.data.evaluation import evaluation_split, is_dataset_split
from hyperdiff.engine.data.failures import named_batches
from hyperdiff.engine.data.loader import LoaderStream, has_random_access
from hyperdiff.engine.data.replay import check_batch
from hyperdiff.engine.data.sources import BatchSource, FromCallable, FullBatch, Recorded, Sequence
from hyperdiff.engine.data.streaming import IterableStream
from hyperdiff.errors import HyperdiffError, describe, positive_int
from hyperdiff.typing import Batch

DEFAULT_WINDOW = 8


def describe_source(data: Any) -> str:
    """A short name for a data source in messages, e.g. ``DataLoader(dataset=Digits, ...)``."""
    if isinstance(data, DataLoader):
        sampler = data.batch_sampler if data.batch_size is None else data.sampler
        return (f"DataLoader(dataset={type(data.dataset).__name__}, batch_size="
                f"{data.batch_size}, sampler={type(sampler).__name__}, "
                f"num_workers={data.num_workers})")
    if inspect.isfunction(data) or inspect.ismethod(data):
        return f"function {data.__qualname__}"
    text = describe(data)
    name = type(data).__name__
    return text if text.startswith(name) else f"{name} {text}"


def _required_positional(fn: Callable[..., Any]) -> int | None:
    """Number of required positional parameters of ``fn``, None if it cannot be inspected."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in parameters)


def stream(data: Any, *, window: int = DEFAULT_WINDOW) -> BatchSource:
    """A lazily read source for a ``DataLoader``, re-iterable or generator function, keeping at
    most ``window`` batches in memory (``as_source`` uses ``window=8``).

    Raises:
        HyperdiffError: ``data`` cannot be streamed (see :func:`as_source`).
    """
    name = describe_source(data)
    window = positive_int("data", "window", window)
    if isinstance(data, DataLoader):  # room for what the workers prefetch
        window = max(window, data.num_workers * (data.prefetch_factor or 0))
    if has_random_access(data):
        return LoaderStream(data, name, window=window)
    if callable(data) and not hasattr(data, "__iter__"):
        if _required_positional(data) == 0:
            return IterableStream(data, name, factory=True, window=window)
        raise HyperdiffError(f"data: stream needs an iterable or a function of no arguments "
                             f"(got {name})")
    if isinstance(data, Tensor):
        raise HyperdiffError(
            f"data: stream needs a DataLoader, a re-iterable of batches or a function of no "
            f"arguments (got {name}, which would stream each row as its own batch); pass the "
            "tensor itself as one batch, or hd.minibatches(x, y, batch_size=...)")
    if isinstance(data, Iterator):
        raise HyperdiffError(
            f"data: stream needs a re-iterable (got the one-shot iterator {name}); pass a list, "
            "a DataLoader, or a zero-argument function that returns a new iterator"
        )
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, bytearray)):
        return IterableStream(data, name, window=window)
    raise HyperdiffError(f"data: stream needs a DataLoader, a re-iterable or a function of no "
                         f"arguments (got {name})")


def as_source(data: Any, name: str = "train_data") -> BatchSource:
    """Turn user data into a :class:`BatchSource` (see the module doc for the rules)."""
    if isinstance(data, BatchSource):
        return data
    if data is None:
        raise HyperdiffError(f"hypergradient: {name} must be given (got None)")
    if isinstance(data, (str, bytes, bytearray)):
        raise HyperdiffError(
            f"hypergradient: {name} must be a tensor, a tuple or dict of tensors, a list of "
            f"batches, a DataLoader or other iterable of batches, or a function fn(step, seed) "
            f"(got {type(data).__name__} {describe(data)}: text is not data)"
        )
    if isinstance(data, (Tensor, tuple, dict)):
        return FullBatch(data)
    if isinstance(data, list):
        return Sequence(data)
    if callable(data) and not hasattr(data, "__iter__"):
        if _required_positional(data) == 0:
            return stream(data)
        return FromCallable(data, describe_source(data))
    if isinstance(data, Iterator):
        return Recorded(data)
    if isinstance(data, Iterable):
        return stream(data)
    raise HyperdiffError(
        f"hypergradient: {name} must be a tensor, a tuple or dict of tensors, a list of "
        f"batches, an iterable, or a callable fn(step) (got {type(data).__name__})"
    )


def _bare_iterable_dataset(data: Any) -> bool:
    """An ``IterableDataset`` not in a ``DataLoader``: its items are batches, as in
    train_data (a stream of samples goes in a ``DataLoader(batch_size=B)``)."""
    return isinstance(data, IterableDataset)


def validation_batches(data: Any, caller: str = "hypergradient", name: str = "val_data"
                       ) -> list[Batch]:
    """Validation data as a list of batches: one batch, or every batch of a list/iterable
    (``name``: the argument, as ``caller``'s messages call it)."""
    kinds = "a tensor, a tuple or dict of tensors, or a list or iterable of batches"
    if data is None:
        raise HyperdiffError(f"{caller}: {name} must be given (got None)")
    if isinstance(data, (str, bytes, bytearray)):
        raise HyperdiffError(f"{caller}: {name} must be {kinds} (got {type(data).__name__} "
                             f"{describe(data)}: text is not data)")
    if isinstance(data, (Tensor, tuple, dict)):
        return [check_batch(data, f"{caller}: {name}")]
    if is_dataset_split(data) and not _bare_iterable_dataset(data):  # seeded, state untouched
        batches = list(iter(evaluation_split("validation" if name == "val_data" else name, data)))
        if not batches:
            raise HyperdiffError(f"{caller}: {name} must hold at least one batch (got 0)")
        return batches
    if isinstance(data, Iterable):
        batches = list(named_batches(lambda: iter(data), lambda j: f"batch {j} of {name}"))
        if not batches:
            raise HyperdiffError(f"{caller}: {name} must hold at least one batch (got 0)")
        for i, batch in enumerate(batches):
            check_batch(batch, f"{caller}: {name} batch {i}")
        return batches
    raise HyperdiffError(f"{caller}: {name} must be {kinds} (got {type(data).__name__})")
