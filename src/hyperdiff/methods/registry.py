"""Name registries of the outer loop: hypergradient methods and outer optimizers.

A method is registered as ``"module:constructor"`` and imported on first use, so adding one
(``"implicit": "hyperdiff.methods.implicit:implicit"``) is one line and costs nothing until a
config asks for it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from hyperdiff.errors import fail
from hyperdiff.methods.base import Capabilities, Method

METHODS: dict[str, str] = {
    "reverse": "hyperdiff.methods.reverse:reverse",
    "forward": "hyperdiff.methods.forward:forward",
    "finite_difference": "hyperdiff.methods.finite_difference:finite_difference",
    "truncated": "hyperdiff.methods.truncated:truncated",
    "checkpointed": "hyperdiff.methods.checkpointed:checkpointed",
    "implicit": "hyperdiff.methods.implicit:implicit",
    "reversible": "hyperdiff.methods.reversible:reversible",
    "curvature": "hyperdiff.methods.curvature:curvature",
    "fomaml": "hyperdiff.methods.fomaml:fomaml",
    "reptile": "hyperdiff.methods.reptile:reptile",
}
"""Method name -> ``"module:constructor"``, imported on first use. One line adds a method; its
module declares ``CAPABILITIES`` (:class:`~hyperdiff.methods.base.Capabilities`)."""

OPTIMIZERS: dict[str, str] = {
    "adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop",
}
"""Outer optimizer name -> ``torch.optim`` class name."""

SCHEDULES = ("constant", "cosine")
"""Outer learning-rate schedules: constant, or cosine decay to 0 over the step budget."""


def capabilities(name: str) -> Capabilities:
    """The :class:`Capabilities` that the module of method ``name`` declares as
    ``CAPABILITIES``; a module that declares none holds an offline-only method (the defaults)."""
    module = importlib.import_module(METHODS[name].split(":")[0])
    declared = getattr(module, "CAPABILITIES", Capabilities())
    return declared if isinstance(declared, Capabilities) else Capabilities()


def methods_where(**flags: bool) -> list[str]:
    """The registered names whose capabilities have the ``flags`` given, in registry order:
    ``methods_where(online=True)``."""
    return [name for name in METHODS
            if all(getattr(capabilities(name), k) == v for k, v in flags.items())]


def method_constructor(name: str, caller: str = "HyperOptimizer") -> Callable[..., Method]:
    """The constructor registered as ``name`` in :data:`METHODS` (of an offline method)."""
    offline = methods_where(offline=True)
    if name in METHODS and name not in offline:
        raise fail(caller, "method", f"one of {sorted(offline)} ({name!r} exists "
                   "only in online tuning: plan=hd.plans.OnlinePlan(...), outer.mode = 'online')",
                   name)
    if name not in METHODS:
        raise fail(caller, "method", f"one of {sorted(offline)}", name)
    return registered_constructor(name)


def registered_constructor(name: str) -> Callable[..., Method]:
    """The constructor of ``name`` (a key of :data:`METHODS`), offline or not."""
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def make_method(name: str, **options: Any) -> Method:
    """``make_method("forward", chunk_size=8)`` -> ``hd.forward(chunk_size=8)``."""
    return method_constructor(name)(**options)


def unread_options(method: Method) -> dict[str, Any]:
    """The options of ``method`` (a registered method) that its online segment does not read
    (not in ``capabilities.segment_options``) but that are set off its constructor's default:
    an online run would ignore them. ``{}`` for a method that is not registered."""
    if method.name not in METHODS:
        return {}
    defaults = {name: p.default for name, p in
                inspect.signature(registered_constructor(method.name)).parameters.items()}
    read = set(method.capabilities.segment_options)
    return {name: value for name, value in method.options.items()
            if name not in read and name in defaults and value is not defaults[name]
            and not _same(value, defaults[name])}


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default)
    except (TypeError, RuntimeError, ValueError):  # e.g. tensors
        return False
