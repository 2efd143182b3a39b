"""Failures of the user's data, said as data problems that name where they happened.

Training replays batches read by the user's own code (a ``Dataset``'s ``__getitem__``, a
``collate_fn``, a generator, ``fn(step, seed)``). An exception from that code, ragged samples
that ``collate`` cannot stack, or a NaN in a batch read late in training would otherwise reach
the user as torch's traceback with no source named, or as "inner training diverged; lower the
learning rate". Here each becomes one :class:`~hyperdiff.HyperdiffError` naming the split, the
step or batch and the sample, raised ``from`` the original exception (which is kept).
"""

from __future__ import annotations

import cmath
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.data.replay import array_leaf
from hyperdiff.errors import HyperdiffError
from hyperdiff.tree import leaves
from hyperdiff.typing import Batch

SHOWN = 8  # sample indices listed in a message


class SampleError(HyperdiffError):
    """A ``Dataset``'s ``__getitem__`` failed on one sample (the message names its index).

    Built from one string, so that a ``DataLoader`` worker can re-raise it in the main process.
    """


def indices_text(indices: Sequence[int]) -> str:
    """``"[3, 9, 1]"``, or the first :data:`SHOWN` and a count for a long list."""
    shown = ", ".join(str(i) for i in indices[:SHOWN])
    more = f", ... ({len(indices)} in all)" if len(indices) > SHOWN else ""
    return f"[{shown}{more}]"


def summary(err: BaseException) -> str:
    """``"KeyError: 'x'"``; for an error re-raised from a ``DataLoader`` worker (whose message
    is the worker's whole traceback) its last line."""
    text = str(err)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):  # "pkg.Error: message" last
        name, _, message = lines[-1].partition(": ")
        text = message if name.rpartition(".")[2] == type(err).__name__ else lines[-1]
    return text if isinstance(err, HyperdiffError) else f"{type(err).__name__}: {text}"


def read_failed(where: str, err: BaseException, detail: str = "") -> HyperdiffError:
    """``"data: <where> must be readable by the data's own code (got <err><detail>)"``."""
    return HyperdiffError(f"data: {where} must be readable by the data's own code (got "
                          f"{summary(err)}{detail}); fix the Dataset, collate_fn or generator")


@contextmanager
def user_code(where: Callable[[], str], detail: Callable[[BaseException], str] | None = None
              ) -> Iterator[None]:
    """Run the user's data code; re-raise any exception as :func:`read_failed` naming
    ``where()`` (and ``detail(err)``, e.g. which sample is ragged). hyperdiff's own errors pass,
    except a :class:`SampleError` (which gains the step or batch)."""
    try:
        yield
    except StopIteration:
        raise
    except HyperdiffError as err:
        if not isinstance(err, SampleError) and "Caught SampleError" not in str(err):
            raise
        raise read_failed(where(), err) from err
    except Exception as err:
        raise read_failed(where(), err, detail(err) if detail else "") from err


def named_batches(start: Callable[[], Iterator[Batch]], where: Callable[[int], str],
                  detail: Callable[[int, BaseException], str] | None = None
                  ) -> Iterator[Batch]:
    """The batches of ``start()``, an exception from the data's own code named by
    ``where(j)`` (and ``detail(j, err)``) for batch ``j`` (``where(0)`` when starting fails)."""
    with user_code(partial(where, 0)):
        iterator = start()
    j = 0
    while True:
        try:
            with user_code(partial(where, j), None if detail is None else partial(detail, j)):
                batch = next(iterator)
        except StopIteration:
            return
        yield batch
        j += 1


def ragged(samples: Sequence[Any], indices: Sequence[int]) -> str:
    """``"; sample 9's [0] has shape (4,), sample 3's (3,)"``: the first sample whose fields'
    shapes differ from the first sample's (what ``collate`` cannot stack), or ``""``."""

    def shapes(sample: Any) -> dict[str, tuple[int, ...] | None]:
        return {path or "the sample": tuple(getattr(leaf, "shape", ())) if hasattr(
            leaf, "shape") else None for path, leaf in leaves(sample)}

    first = shapes(samples[0])
    for sample, index in zip(samples[1:], indices[1:], strict=True):
        other = shapes(sample)
        if other.keys() != first.keys():
            return (f"; sample {index} has the fields {sorted(other)}, sample {indices[0]} "
                    f"{sorted(first)}")
        for path, shape in other.items():
            if shape != first[path]:
                return (f"; sample {index}'s {path} has shape {shape}, sample {indices[0]}'s "
                        f"{first[path]}")
    return ""


def first_row(mask: Tensor) -> int | None:
    """The first index along dim 0 where boolean ``mask`` has a True entry (``None`` for a 0-d
    mask or none)."""
    if mask.dim() == 0 or not bool(mask.any()):
        return None
    return int(mask.reshape(mask.shape[0], -1).any(1).nonzero()[0, 0])


def first_nonfinite(batch: Batch) -> tuple[str, int | None, int] | None:
    """``(field, row, count)``: the first floating field of ``batch`` holding NaN or inf, the
    row (index along dim 0; ``None`` for a 0-d field) of its first such entry, and how many
    entries are non-finite; ``None`` when every value is finite."""
    for path, leaf in leaves(batch):
        leaf = as_tensor if (as_tensor := array_leaf(leaf)) is not None else leaf
        if isinstance(leaf, Tensor) and (leaf.is_floating_point() or leaf.is_complex()):
            if cmath.isfinite(leaf.detach().sum().item()):  # a NaN or inf makes the sum one
                continue
            bad = ~torch.isfinite(leaf.detach())
            if bool(bad.any()):
                return path or "the batch", first_row(bad), int(bad.sum())
    return None


def check_rows(where: Callable[[], str], batch: Batch) -> None:
    """Raise a data error if every tensor of ``batch`` with a row dimension has zero rows (a
    ``collate_fn`` that filtered every sample out): its mean loss would be NaN, read as a
    divergence. ``where`` is called only then."""
    shaped = [(path, leaf) for path, leaf in leaves(batch)
              if isinstance(leaf, Tensor) and leaf.dim() >= 1]
    if shaped and all(leaf.shape[0] == 0 for _, leaf in shaped):
        path, leaf = shaped[0]
        raise HyperdiffError(
            f"data: {where()} must have at least one row (got field {path or 'the batch'} of "
            f"shape {tuple(leaf.shape)}); a collate_fn or filter must not drop every sample of "
            "a batch")


def check_devices(where: Callable[[], str], batch: Batch) -> None:
    """Refuse a tensor of ``batch`` on a device hyperdiff does not run on (``meta``, whose
    values the data checks cannot read), as in-memory data is refused by ``make_problem``."""
    for path, leaf in leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.device.type not in ("cpu", "cuda", "mps"):
            raise HyperdiffError(
                f"data: the device of field {path or 'the batch'} of {where()} must be the CPU, "
                f"CUDA or MPS (got {str(leaf.device)!r}, whose values hyperdiff cannot read); "
                "yield tensors on the CPU, or on the device the problem is moved to")


def check_finite(where: Callable[[], str], batch: Batch,
                 rows: Callable[[], Sequence[int] | None] | None = None) -> None:
    """Raise a data error if ``batch`` holds NaN or inf: which field, which row and (``rows()``:
    the dataset index of each row) which sample. ``where`` and ``rows`` are called only then."""
    found = first_nonfinite(batch)
    if found is None:
        return
    field, row, count = found
    indices = rows() if rows is not None else None
    at = ""
    if row is not None:
        at = f", first at row {row}"
        if indices is not None and row < len(indices):
            at += f" (sample {indices[row]})"
    raise HyperdiffError(
        f"data: {where()} must be finite (got {count} NaN or infinite entries in field "
        f"{field}{at}); clean or impute the data: a NaN in the data is not a divergence")
