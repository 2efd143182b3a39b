"""Name registries of the outer loop: hypergradient methods and outer optimizers.

A method is registered as ``"module:constructor"`` and imported on first use, so adding one
(``"implicit": "hyperdiff.methods.implicit:implicit"``) is one line and costs nothing until a
config asks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from hyperdiff.errors import fail
from hyperdiff.methods.base import Method

METHODS: dict[str, str] = {
    "reverse": "hyperdiff.methods.reverse:reverse",
    "forward": "hyperdiff.methods.forward:forward",
    "finite_difference": "hyperdiff.methods.finite_difference:finite_difference",
    "truncated": "hyperdiff.methods.truncated:truncated",
    "checkpointed": "hyperdiff.methods.checkpointed:checkpointed",
    "implicit": "hyperdiff.methods.implicit:implicit",
    "reversible": "hyperdiff.methods.reversible:reversible",
}
"""Method name -> ``"module:constructor"``, imported on first use. One line adds a method."""

ONLINE_ONLY_METHODS = ("curvature",)
"""Window hypergradients of online tuning with no offline method of the same name."""

OPTIMIZERS: dict[str, str] = {
    "adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop",
}
"""Outer optimizer name -> ``torch.optim`` class name."""

SCHEDULES = ("constant", "cosine")
"""Outer learning-rate schedules: constant, or cosine decay to 0 over the step budget."""


def method_constructor(name: str) -> Callable[..., Method]:
    """The constructor registered as ``name`` in :data:`METHODS`."""
    if name in ONLINE_ONLY_METHODS:
        raise fail("HyperOptimizer", "method", f"one of {sorted(METHODS)} ({name!r} exists "
                   "only in online tuning: hd.online.OnlineTuner, outer.mode = 'online')", name)
    if name not in METHODS:
        raise fail("HyperOptimizer", "method", f"one of {sorted(METHODS)}", name)
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def make_method(name: str, **options: Any) -> Method:
    """``make_method("forward", chunk_size=8)`` -> ``hd.forward(chunk_size=8)``."""
    return method_constructor(name)(**options)
