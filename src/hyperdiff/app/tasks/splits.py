"""Row splits and cross-validation folds of a task's data, by scikit-learn.

Splits are drawn once from ``data_seed`` with :func:`sklearn.model_selection.train_test_split`:
``test`` first, then ``val`` from the rest, then ``selection`` is taken out of ``val``
(``selection_fraction`` of it); what is left is ``train``. With ``cv_folds = k`` the pool
``train + val`` is cut by :class:`~sklearn.model_selection.KFold`. When the task is a
classification (integer labels) every cut is stratified by label
(:class:`~sklearn.model_selection.StratifiedKFold`), so every split keeps the class shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError


@dataclass(frozen=True)
class Splits:
    """Sorted row indices (int64 tensors) of each split; ``selection`` may be empty."""

    train: Tensor
    val: Tensor
    selection: Tensor
    test: Tensor

    def sizes(self) -> dict[str, int]:
        return {name: int(rows.numel()) for name, rows in self.__dict__.items()}


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
        text = str(err)
        if len(text) > 200:
            text = text[:197] + "..."
        stratified = ("" if labels is None else
                      f", or hd.task(..., stratify=False) if the {len(np.unique(labels))} "
                      "distinct integer targets are not classes (a regression, counts)")
        raise HyperdiffError(
            f"task: the {what} split must be drawable from {len(rows)} rows ({size} rows "
            f"asked; got scikit-learn's error: {text}); use more data or other split "
            f"fractions{stratified}"
        ) from None
    return rest, taken


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
    n_test, n_val = int(round(test * n)), int(round(val * n))
    n_sel = int(round(selection_fraction * n_val))
    if n_test < 1 or n_val - n_sel < 1 or n - n_test - n_val < 1:
        raise HyperdiffError(
            f"task: every split must keep at least one row (got {n} rows: test {n_test}, "
            f"validation {n_val - n_sel}, selection {n_sel}, train {n - n_test - n_val}); "
            "lower selection_fraction or use more data"
        )
    y = None if labels is None else labels.detach().cpu().numpy()
    rest, test_rows = _cut(np.arange(n), n_test, y, seed, "test")
    train_rows, val_all = _cut(rest, n_val, y, seed + 1, "validation")
    if n_sel:
        val_rows, sel_rows = _cut(val_all, n_sel, y, seed + 2, "selection")
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
    n_sel = int(round(selection_fraction * n))
    if n_sel == 0:
        return torch.arange(n, device="cpu"), torch.arange(0, device="cpu")
    if n - n_sel < 1:
        raise HyperdiffError(
            f"task: selection_fraction={selection_fraction} must leave validation rows (got "
            f"{n} validation rows, all taken by the selection split)"
        )
    y = None if labels is None else labels.detach().cpu().numpy()
    val_rows, sel_rows = _cut(np.arange(n), n_sel, y, seed + 2, "selection")
    return _rows(val_rows), _rows(sel_rows)


def fold_rows(pool: Tensor, folds: int, seed: int, labels: Tensor | None = None
              ) -> list[tuple[Tensor, Tensor]]:
    """``folds`` (train, validation) row pairs that cut ``pool`` into near-equal parts
    (:class:`~sklearn.model_selection.StratifiedKFold` by ``labels`` when given)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= pool.numel():
        raise HyperdiffError(
            f"task: cv_folds must be 0 (off) or an int in [2, {pool.numel()}] (got {folds})"
        )
    rows = pool.cpu().numpy()
    if labels is None:
        cuts = KFold(folds, shuffle=True, random_state=seed + 1).split(rows)
    else:
        y = labels.detach().cpu().numpy()[rows]
        _, counts = np.unique(y, return_counts=True)
        splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed + 1)
                    if counts.min() >= folds else KFold(folds, shuffle=True, random_state=seed + 1))
        cuts = splitter.split(rows, y)
    return [(_rows(rows[tr]), _rows(rows[va])) for tr, va in cuts]


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
