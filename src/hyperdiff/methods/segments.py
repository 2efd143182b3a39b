"""What the segment functions of the methods share (:meth:`Method.segment`, ``methods/base.py``).

Every segment takes and returns detached states; the validation loss at its end is taken at the
segment's validation batches (an online window's batch ``B_h``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import TrainState
from hyperdiff.typing import Batch


def detach_tree(tree: Any) -> Any:
    """``tree`` (tensors in dicts, tuples, NamedTuples, lists) with every tensor detached."""
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {k: detach_tree(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        items = [detach_tree(v) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    if isinstance(tree, list):
        return [detach_tree(v) for v in tree]
    return tree


def detached_state(state: Any) -> TrainState:
    """A :class:`TrainState` of ``(params, buffers, opt_state)`` with every tensor detached."""
    params, buffers, opt_state = state
    return TrainState(detach_tree(params), detach_tree(buffers), detach_tree(opt_state))


def at_val_batches(problem: Problem, val_batches: list[Batch]) -> Problem:
    """``problem`` with its validation data replaced by the segment's batches."""
    return replace(problem, val_data=val_batches)


__all__ = ["at_val_batches", "detach_tree", "detached_state"]
