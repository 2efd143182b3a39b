"""What the segment functions of the methods share (:meth:`Method.segment`, ``methods/base.py``).

Every segment takes and returns detached states; the validation loss at its end is taken at the
segment's validation batches (an online window's batch ``B_h``). A method that evaluates one
trajectory at several sets of validation batches (``Method.segment_samples``, an online window
with samples) takes every set's gradient through the shared graph (:func:`sample_grads`).
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


def sample_grads(values: list[Tensor], inputs: list[Tensor], *, retain: bool = False
                 ) -> list[list[Tensor]]:
    """``d values[j] / d inputs`` for every ``j`` (zeros for inputs a value does not use),
    through the values' shared graph (an online window's, ``Method.segment_samples``), kept
    after the last with ``retain``.

    Several values take one batched vector-Jacobian product, ``J^T e_j`` for the ``m`` rows of
    the identity at once (``is_grads_batched``): on the digits MLP's reverse windows 1.25x
    (2 samples), 1.3x (4) and 2x (8) faster than one backward pass per value (docs/online.md,
    "Samples per window"). Where ``vmap`` cannot batch the backward (an operation without a batching
    rule; the all-reduce of ``hd.distributed.data_parallel``), one backward pass per value,
    the graph kept until the last."""
    if len(values) > 1:
        stacked = torch.stack(values)
        eye = torch.eye(len(values), dtype=stacked.dtype, device=stacked.device)
        try:
            rows = torch.autograd.grad(stacked, inputs, eye, retain_graph=True,
                                       allow_unused=True, is_grads_batched=True)
        except RuntimeError:  # the graph is retained: the loop below can still use it
            pass
        else:
            return [zeros_for_unused(tuple(None if g is None else g[j] for g in rows), inputs)
                    for j in range(len(values))]
    last = len(values) - 1
    return [zeros_for_unused(torch.autograd.grad(value, inputs, allow_unused=True,
                                                 retain_graph=retain or j < last), inputs)
            for j, value in enumerate(values)]


__all__ = ["at_val_batches", "detach_tree", "detached_state", "sample_grads"]
