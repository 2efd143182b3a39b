"""Row splits and cross-validation folds of a task's data, by scikit-learn.

Splits are drawn once from ``data_seed`` with :func:`sklearn.model_selection.train_test_split`:
``test`` first, then ``val`` from the rest, then ``selection`` is taken out of ``val``
(``selection_fraction`` of it); what is left is ``train``. With ``cv_folds = k`` the pool
``train + val`` is cut by :class:`~sklearn.model_selection.KFold`. When the task is a
classification (integer labels) every cut is stratified by label
(:class:`~sklearn.model_selection.StratifiedKFold`), so every split keeps the class shares
(a class with fewer rows than folds is spread as evenly as its rows allow; a class with one
validation row stays in the validation part when the selection split is cut). A
``selection_fraction`` above 0 that rounds to no row is refused (:func:`selection_rows`).

``data_seed`` is an int in [0, 2**32 - 1] (scikit-learn's range for ``random_state``); the
later cuts use ``seed + 1`` and ``seed + 2``, wrapped modulo 2**32 at the top of the range.

Splits the user gives (:func:`~hyperdiff.app.tasks.spec.given_splits`) must not share rows: a
test (or selection, or validation) split that holds rows of the training split is not held
out, and the report's "never used while tuning" would be false. Each in-memory split (a
tensor, a tuple or dict of tensors, or a list of such batches) is hashed row by row
(:func:`shared_counts`): the bytes of its *input*, the first tensor of each batch
(``batch[0]``, or a dict's first entry), with its dtype and row shape; a ``Dataset``,
``DataLoader`` or generator function is not read for this. Equal inputs count as shared, also
when they are duplicate examples of the data rather than the same row:
``given_splits(..., allow_shared_rows=True)`` accepts them.

>>> x = torch.arange(12.0).reshape(6, 2)
>>> shared_counts({"train": [(x[:4],)], "val": None, "test": [(x[2:],)]})
({('train', 'test'): 2}, {'train': 4, 'test': 4})
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hyperdiff.engine.datacheck import tensors_in
from hyperdiff.errors import HyperdiffError, fail
from hyperdiff.typing import Batch

MAX_DATA_SEED = 2**32 - 1
"""The largest ``data_seed``: scikit-learn takes a ``random_state`` up to 2**32 - 1."""


@dataclass(frozen=True)
class Splits:
    """Sorted row indices (int64 tensors) of each split; ``selection`` may be empty."""

    train: Tensor
    val: Tensor
    selection: Tensor
    test: Tensor

    def sizes(self) -> dict[str, int]:
        return {name: int(rows.numel()) for name, rows in self.__dict__.items()}


def check_data_seed(caller: str, seed: Any) -> int:
    """``seed`` if it is an int in [0, :data:`MAX_DATA_SEED`], else raise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_DATA_SEED:
        raise fail(caller, "data_seed", f"an int in [0, {MAX_DATA_SEED}]", seed)
    return seed


def derived_seed(seed: int, k: int) -> int:
    """The seed of the ``k``-th later cut: ``seed + k`` wrapped into [0, 2**32).

    >>> derived_seed(7, 1), derived_seed(2**32 - 1, 2)
    (8, 1)
    """
    return (seed + k) % (MAX_DATA_SEED + 1)


def _rows(values: np.ndarray) -> Tensor:
    return torch.as_tensor(np.sort(values), dtype=torch.long, device="cpu")


def _cut(rows: np.ndarray, size: int, labels: np.ndarray | None, seed: int, what: str
         ) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, taken)``: ``size`` rows of ``rows`` taken at random (stratified by labels)."""
    from sklearn.model_selection import train_test_split

    try:
        rest, taken = train_test_split(
            rows, test_size=size, random_state=seed,
            stratify=None if labels is None else labels[rows],
        )
    except ValueError as err:
        text = str(err).split(" Classes with too few members are:")[0]  # not the list
        if len(text) > 200:
            text = text[:197] + "..."
        by, stratified = ("", "") if labels is None else (" stratified by the targets",
                                                          _not_classes(labels))
        raise HyperdiffError(
            f"task: the {what} split must be drawable from {len(rows)} rows{by} ({size} rows "
            f"asked; got scikit-learn's error: {text}); use more data or other split "
            f"fractions{stratified}"
        ) from None
    return rest, taken


def _not_classes(labels: np.ndarray) -> str:
    """The advice for stratified cuts of targets that may not be classes."""
    kind = "float" if labels.dtype.kind in "fc" else "integer"
    return (f", or hd.task(..., stratify=False) if the {len(np.unique(labels))} distinct {kind} "
            "targets are not classes (a regression, counts)")


def split_rows(
    n: int, *, test: float, val: float, selection_fraction: float, seed: int,
    labels: Tensor | None = None,
) -> Splits:
    """Random split of ``n`` rows: ``test`` and ``val`` are fractions of ``n``; the selection
    split takes ``selection_fraction`` of the validation rows; stratified by ``labels``.

    >>> s = split_rows(100, test=0.25, val=0.2, selection_fraction=0.5, seed=0)
    >>> [len(s.train), len(s.val), len(s.selection), len(s.test)]
    [55, 10, 10, 25]
    """
    if not 0.0 <= selection_fraction < 1.0:
        raise HyperdiffError(
            f"task: selection_fraction must be in [0, 1) (got {selection_fraction})"
        )
    for name, fraction in (("test_fraction", test), ("val_fraction", val)):
        if not 0.0 < fraction < 1.0:
            raise HyperdiffError(f"task: {name} must be in (0, 1) (got {fraction})")
    if test + val >= 1.0:
        raise HyperdiffError(f"task: test_fraction + val_fraction must be below 1, leaving rows "
                             f"to train on (got {test} + {val} = {test + val:g})")
    n_test, n_val = int(round(test * n)), int(round(val * n))
    n_sel = selection_rows(selection_fraction, n_val)
    if n_test < 1 or n_val - n_sel < 1 or n - n_test - n_val < 1:
        raise HyperdiffError(
            f"task: every split must keep at least one row (got {n} rows: test {n_test}, "
            f"validation {n_val - n_sel}, selection {n_sel}, train {n - n_test - n_val}); "
            "lower selection_fraction or use more data"
        )
    y = None if labels is None else labels.detach().cpu().numpy()
    rest, test_rows = _cut(np.arange(n), n_test, y, seed, "test")
    train_rows, val_all = _cut(rest, n_val, y, derived_seed(seed, 1), "validation")
    if n_sel:
        val_rows, sel_rows = _cut_selection(val_all, n_sel, y, derived_seed(seed, 2))
    else:
        val_rows, sel_rows = val_all, val_all[:0]
    return Splits(train=_rows(train_rows), val=_rows(val_rows), selection=_rows(sel_rows),
                  test=_rows(test_rows))


def split_given_rows(
    n: int, *, selection_fraction: float, seed: int, labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(val, selection)`` rows of a validation batch of ``n`` rows."""
    if not 0.0 <= selection_fraction < 1.0:
        raise HyperdiffError(
            f"task: selection_fraction must be in [0, 1) (got {selection_fraction})"
        )
    n_sel = selection_rows(selection_fraction, n, "a larger val split in given_splits")
    if n_sel == 0:
        return torch.arange(n, device="cpu"), torch.arange(0, device="cpu")
    if n - n_sel < 1:
        raise HyperdiffError(
            f"task: selection_fraction={selection_fraction} must leave validation rows (got "
            f"{n} validation rows, all taken by the selection split)"
        )
    y = None if labels is None else labels.detach().cpu().numpy()
    val_rows, sel_rows = _cut_selection(np.arange(n), n_sel, y, derived_seed(seed, 2))
    return _rows(val_rows), _rows(sel_rows)


def selection_rows(selection_fraction: float, n_val: int,
                   more: str = "a larger val_fraction or more data") -> int:
    """The rows ``selection_fraction`` takes of ``n_val`` validation rows (rounded); a fraction
    above 0 that rounds to none is refused rather than read as switching the split off
    (``more``: how to get more validation rows).

    >>> selection_rows(0.5, 10), selection_rows(0.0, 10)
    (5, 0)
    """
    n_sel = int(round(selection_fraction * n_val))
    if selection_fraction > 0 and n_sel == 0 and n_val >= 1:  # 0 rows: the caller refuses
        larger = (f"a larger task.selection_fraction ({1 / n_val:.3g} or more takes one row), "
                  if n_val >= 2 else "")
        raise HyperdiffError(
            f"task: selection_fraction must take at least one of the {n_val} validation rows "
            f"when it is above 0 (got {selection_fraction}, which rounds to 0 rows); use "
            f"{larger}more validation rows ({more}), or "
            "task.selection_fraction = 0 to switch the selection split off")
    return n_sel


def _cut_selection(rows: np.ndarray, size: int, labels: np.ndarray | None, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(val, selection)``: :func:`_cut` of the selection split, stratified by the classes
    with at least 2 of ``rows`` (a class with one row there cannot be stratified: its row
    stays in the validation part). Without such a class the cut is :func:`_cut`'s."""
    if labels is not None:
        classes, counts = np.unique(labels[rows], return_counts=True)
        single = np.isin(labels[rows], classes[counts < 2])
        if single.any() and (~single).sum() > size:
            val_rows, sel_rows = _cut(rows[~single], size, labels, seed, "selection")
            return np.concatenate([val_rows, rows[single]]), sel_rows
    return _cut(rows, size, labels, seed, "selection")


def fold_rows(pool: Tensor, folds: int, seed: int, labels: Tensor | None = None,
              *, stratify: bool | None = None) -> list[tuple[Tensor, Tensor]]:
    """``folds`` (train, validation) row pairs that cut ``pool`` into near-equal parts
    (:class:`~sklearn.model_selection.StratifiedKFold` by ``labels`` when given and some class
    has ``folds`` rows; a rarer class is spread as evenly as its rows allow). With
    ``stratify=True`` (asked for explicitly) labels of which no class has that many rows are
    refused rather than cut unstratified."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= pool.numel():
        raise HyperdiffError(
            f"task: cv_folds must be 0 (off) or an int in [2, {pool.numel()}] (got {folds})"
        )
    rows = pool.cpu().numpy()
    fold_seed = derived_seed(seed, 1)
    if labels is None:
        return _fold_pairs(rows, KFold(folds, shuffle=True, random_state=fold_seed).split(rows))
    y = labels.detach().cpu().numpy()[rows]
    _, counts = np.unique(y, return_counts=True)
    if counts.max() < folds:
        if stratify:
            raise HyperdiffError(
                f"task: stratify=True needs a class with at least cv_folds = {folds} rows in "
                f"the cross-validation pool to stratify the folds (got at most {counts.max()} "
                f"rows in each of {len(counts)} classes); lower task.cv_folds{_not_classes(y)}")
        return _fold_pairs(rows, KFold(folds, shuffle=True, random_state=fold_seed).split(rows))
    with warnings.catch_warnings():  # a class with fewer rows than folds: spread evenly
        warnings.filterwarnings("ignore", message="The least populated class in y has only",
                                category=UserWarning)
        cuts = list(StratifiedKFold(folds, shuffle=True, random_state=fold_seed).split(rows, y))
    return _fold_pairs(rows, cuts)


def _fold_pairs(rows: np.ndarray, cuts: Any) -> list[tuple[Tensor, Tensor]]:
    return [(_rows(rows[tr]), _rows(rows[va])) for tr, va in cuts]


def labels_needed(name: str, given: bool = False) -> HyperdiffError:
    """The refusal of ``stratify=True`` when the labels cannot be read: from ``data``, or from
    the validation batches of ``given_splits`` (``given``) that the selection split is cut from."""
    if not given:
        return HyperdiffError(f"{name}: stratify=True needs labels, a 1-d tensor as the second "
                              "element of data (or data['y'])")
    return HyperdiffError(f"{name}: stratify=True needs labels, a 1-d tensor as the second "
                          "element of every batch of given_splits' val (or batch['y']), to "
                          "stratify the selection split cut from it; pass stratify=None or "
                          "False, or given_splits(selection=...)")


def stratify_labels(data: Any, *, any_dtype: bool = False) -> Tensor | None:
    """Class labels of a batch (``data[1]`` or ``data["y"]``, 1-d): integer ones, or any
    dtype with ``any_dtype`` (e.g. 0./1. targets of a binary cross-entropy); else ``None``."""
    labels = (data.get("y") if isinstance(data, dict)
              else data[1] if isinstance(data, (tuple, list)) and len(data) > 1 else None)
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        return None
    if any_dtype or not (labels.is_floating_point() or labels.is_complex()):
        return labels
    return None


SPLITS = ("train", "val", "selection", "test")
"""The splits :func:`shared_counts` compares, in this order."""


def in_memory_batches(data: Any) -> list[Batch] | None:
    """``data`` as a list of in-memory batches (one batch, or a list of them), or ``None``
    for what is read lazily (a ``Dataset``, ``DataLoader``, generator function, ...)."""
    if isinstance(data, (Tensor, tuple, dict)):
        return [data]
    if isinstance(data, list) and data and all(isinstance(b, (Tensor, tuple, dict))
                                               for b in data):
        return data
    return None


def row_keys(batches: list[Batch]) -> list[tuple[str, tuple[int, ...], bytes]]:
    """``(dtype, row shape, digest of the row's bytes)`` of every row of the first tensor of
    each batch, in order."""
    keys = []
    for batch in batches:
        first = next((t for _, t in tensors_in(batch) if t.dim() >= 1), None)
        if first is None:
            continue
        rows = first.detach().cpu().contiguous()
        shape, dtype = tuple(rows.shape[1:]), str(rows.dtype)
        raw = rows.reshape(rows.shape[0], -1).view(torch.uint8).numpy()
        keys += [(dtype, shape, hashlib.blake2b(row.tobytes(), digest_size=16).digest())
                 for row in raw]
    return keys


def shared_counts(splits: Mapping[str, list[Batch] | None]
                  ) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """``({(earlier, later): rows of the later split whose input is also in the earlier},
    {split: rows})`` for every pair of in-memory ``splits`` (in :data:`SPLITS`) that share
    any (``None``: a split not in memory, left out)."""
    keys = {name: row_keys(batches) for name in SPLITS
            if (batches := splits.get(name)) is not None}
    names, seen = list(keys), {name: set(k) for name, k in keys.items()}
    counts = {(a, b): count for i, a in enumerate(names) for b in names[i + 1:]
              if (count := sum(key in seen[a] for key in keys[b]))}
    return counts, {name: len(k) for name, k in keys.items()}


def shared_rows_text(counts: Mapping[tuple[str, str], int],
                     sizes: Mapping[str, int]) -> str:
    """``"20 of the test split's 20 rows are in the train split; ..."``."""
    return "; ".join(f"{count} of the {b} split's {sizes[b]} rows are in the {a} split"
                     for (a, b), count in counts.items())
