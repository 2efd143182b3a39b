"""What the segment functions of the methods share (:meth:`Method.segment`, ``methods/base.py``).

Every segment takes and returns detached states; the validation loss at its end is taken at the
segment's validation batches (an online window's batch ``B_h``). A method that evaluates one
trajectory at several sets of validation batches (``Method.segment_samples``, an online window
with samples) takes one gradient per set through the shared graph (:func:`sample_grads`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import TrainState, zeros_for_unused
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


def sample_grads(values: list[Tensor], inputs: list[Tensor]) -> list[list[Tensor]]:
    """``d values[j] / d inputs`` for every ``j`` (zeros for inputs a value does not use): one
    backward pass per value through their shared graph, which is kept until the last.

    Measured against one batched vector-Jacobian product (``is_grads_batched``) over the
    values on the digits MLP's reverse windows: docs/online.md, "Samples per window"."""
    last = len(values) - 1
    return [zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True,
                                                 retain_graph=j < last), inputs)
            for j, value in enumerate(values)]


__all__ = ["at_val_batches", "detach_tree", "detached_state", "sample_grads"]
