"""Pytrees: nested tuples, lists and dicts of tensors, flattened, rebuilt and mapped.

The only module of hyperdiff that imports a private torch module (``torch.utils._pytree``,
which torch keeps stable in practice but does not document as public); every other module
takes its pytree helpers from here, so a change in torch is fixed in one place. For the same
reason it also names :data:`BatchNormBase`, torch's private base class of every batch-norm
layer (``torch.nn.modules.batchnorm._BatchNorm``), which :mod:`hyperdiff.engine.models` needs
to find them.

>>> import torch
>>> leaves, spec = tree_flatten({"a": (torch.ones(1), 2)})
>>> len(leaves), tree_unflatten(leaves, spec)["a"][1]
(2, 2)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

BatchNormBase = _BatchNorm
"""The base class of ``nn.BatchNorm1d/2d/3d``, their lazy forms and ``nn.SyncBatchNorm``."""


def move(data: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """``data`` (a tensor, or tuples / lists / dicts of them) with every tensor on ``device``;
    floating-point tensors are also cast to ``dtype`` when it is given. Non-tensors are kept."""

    def one(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)

    return tree_map(one, data)


def leaves(batch: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` pairs of a batch: tensors and other leaves inside mappings/lists/tuples."""
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from leaves(value, f"{path}[{key!r}]")
    elif isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, batch


__all__ = ["BatchNormBase", "TreeSpec", "leaves", "move", "tree_flatten", "tree_map",
           "tree_unflatten"]
