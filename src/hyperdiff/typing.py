"""Type aliases shared across hyperdiff."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from torch import Tensor

Params: TypeAlias = dict[str, Tensor]
"""Model parameters (or buffers, or gradients): parameter name -> tensor."""

HParams: TypeAlias = Mapping[str, Tensor]
"""Hyperparameter values in natural units: name -> tensor."""

Batch: TypeAlias = Any
"""Whatever a loss function receives as data: a tensor, a tuple of tensors, a dict."""

LossFn: TypeAlias = Callable[..., Any]
"""``loss(params, hparams, batch)`` or ``loss(params, hparams, batch, ctx)`` -> scalar tensor.

The four-argument form receives a :class:`hyperdiff.engine.models.StepContext` (buffers, seed,
train flag) and is what models with BatchNorm or dropout need.
"""
