"""A ``LightningModule``'s ``training_step`` and ``validation_step`` as pure losses.

``loss(params, hparams, batch, ctx) = module.training_step(batch, batch_idx)`` evaluated by
``torch.func.functional_call`` at ``params`` and the carried buffers (through
:func:`hyperdiff.functional`, so BatchNorm statistics are carried and dropout is seeded), never
touching the module's own tensors. ``batch_idx`` is ``step mod batches_per_epoch`` in training
(the index a ``Trainer`` passes) and 0 in validation. ``self.log`` / ``self.log_dict`` calls
inside the steps are dropped while hyperdiff evaluates them (a replay must not log twice), and
the state of every ``torchmetrics.Metric`` in the module is put back after each evaluation (a
replay must not count its batch twice). Reading ``self.global_step`` / ``self.current_epoch``
(or ``self.trainer`` without a ``Trainer``) inside them is refused: hyperdiff evaluates the
steps out of the ``Trainer``'s order, so they would not describe the step evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from hyperdiff.engine.models import FunctionalModel, StepContext
from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.typing import Batch, Params

PREFIX = "module."
StepFn = Callable[[nn.Module, Batch, int], Any]


class _StepCaller(nn.Module):
    """``forward(step, batch, batch_idx) = step(module, batch, batch_idx)``: the one entry
    ``functional_call`` reaches, so any method of the wrapped module runs at given tensors."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, step: StepFn, batch: Batch, batch_idx: int) -> Any:
        return step(self.module, batch, batch_idx)


def _dropped(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``self.log`` while hyperdiff evaluates a step."""


@contextmanager
def quiet_logging(module: nn.Module) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing inside the block (instance attributes
    that shadow the methods, removed afterwards)."""
    names = [n for n in ("log", "log_dict") if hasattr(module, n)]
    for name in names:
        object.__setattr__(module, name, _dropped)
    try:
        yield
    finally:
        for name in names:
            module.__dict__.pop(name, None)


@contextmanager
def kept_metric_states(module: nn.Module) -> Iterator[None]:
    """Every ``torchmetrics.Metric`` in ``module`` ends the block in the state it began it
    (its attributes, with its state tensors and lists copied, are put back)."""
    saved = []
    for sub in module.modules():
        defaults = getattr(sub, "_defaults", None)
        if isinstance(defaults, dict) and callable(getattr(sub, "update", None)):
            attrs = dict(sub.__dict__)
            for name in defaults:
                value = attrs.get(name)
                if isinstance(value, Tensor):
                    attrs[name] = value.clone()
                elif isinstance(value, list):
                    attrs[name] = [v.clone() if isinstance(v, Tensor) else v for v in value]
            saved.append((sub, attrs))
    try:
        yield
    finally:
        for sub, attrs in saved:
            for name in set(sub.__dict__) - set(attrs):
                del sub.__dict__[name]
            sub.__dict__.update(attrs)


def _refused_read(name: str) -> property:
    def read(module: nn.Module) -> Any:
        if name == "trainer" and (getattr(module, "_trainer", None) is not None
                                  or getattr(module, "_fabric", None) is not None):
            return super(type(module), module).trainer  # type: ignore[misc]
        raise HyperdiffError(
            f"{module.__dict__.get('_hyperdiff_caller', 'hyperdiff')}: the module's steps must "
            f"not read self.{name} (got a read in {type(module).__qualname__} while hyperdiff "
            "evaluated training_step / validation_step): hyperdiff replays the steps out of the "
            "Trainer's order, so the Trainer's global_step, current_epoch and trainer do not "
            "describe the step being evaluated (offline there is no Trainer); make the step a "
            "function of its batch and parameters only, and tune what changes with the step "
            "as a hyperparameter (hd.per_step or hd.schedule)")

    return property(read)


_GUARDED: dict[type, type] = {}
GUARDED_READS = ("global_step", "current_epoch", "trainer")


@contextmanager
def step_reads_refused(module: nn.Module, caller: str) -> Iterator[None]:
    """Inside the block, ``module.global_step`` / ``module.current_epoch`` (and
    ``module.trainer`` when no ``Trainer`` is attached) raise a ``HyperdiffError``; the module's
    class is a subclass with these properties for the block's length."""
    cls = type(module)
    if cls in _GUARDED.values() or not all(isinstance(getattr(cls, n, None), property)
                                           for n in GUARDED_READS):
        yield
        return
    if cls not in _GUARDED:
        _GUARDED[cls] = type(cls.__name__, (cls,), {
            "__qualname__": cls.__qualname__, "__module__": cls.__module__,
            **{n: _refused_read(n) for n in GUARDED_READS}})
    module.__class__ = _GUARDED[cls]
    module.__dict__["_hyperdiff_caller"] = caller
    try:
        yield
    finally:
        module.__class__ = cls
        module.__dict__.pop("_hyperdiff_caller", None)


def step_loss(output: Any, caller: str, step_name: str, keys: tuple[str, ...]) -> Tensor:
    """The loss tensor in a step's output: the tensor itself, or ``output[key]`` for the first
    of ``keys`` it holds."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in keys:
            if isinstance(output.get(key), Tensor):
                return output[key]
    raise HyperdiffError(
        f"{caller}: {step_name} must return the loss, a scalar tensor or a dict with a tensor "
        f"under {' or '.join(repr(k) for k in keys)} (got {describe(output)})"
        + ("; return the loss from validation_step or pass val_loss=fn(module, batch)"
           if step_name == "validation_step" else ""))


class LightningSteps:
    """A ``LightningModule``'s steps as functions of a parameter dict (names as in
    ``module.named_parameters()``; ``params`` / ``buffers``: detached copies of the module's
    trainable parameters and BatchNorm running statistics)."""

    def __init__(self, module: nn.Module, caller: str):
        if not isinstance(module, nn.Module) or not callable(getattr(module, "training_step",
                                                                     None)):
            raise HyperdiffError(f"{caller}: module must be a LightningModule with a "
                                 f"training_step (got {describe(module)})")
        self.module, self.caller = module, caller
        self.net = FunctionalModel(_StepCaller(module))
        self.params = {k.removeprefix(PREFIX): v for k, v in self.net.params.items()}
        self.buffers = {k.removeprefix(PREFIX): v for k, v in self.net.buffers.items()}

    def call(self, step: StepFn, params: Params, batch: Batch, batch_idx: int,
             ctx: StepContext) -> Any:
        """``step(module, batch, batch_idx)`` at ``params`` and ``ctx``'s buffers; buffers it
        writes (BatchNorm statistics) go to ``ctx.new_buffers``, its random draws are seeded
        by ``ctx`` as every hyperdiff model call is."""
        inner = StepContext(step=ctx.step, seed=ctx.seed, train=ctx.train,
                            buffers={PREFIX + k: v for k, v in ctx.current_buffers().items()},
                            calls=ctx.calls)
        with quiet_logging(self.module), kept_metric_states(self.module), \
                step_reads_refused(self.module, self.caller):
            out = self.net({PREFIX + k: v for k, v in params.items()}, step, batch, batch_idx,
                           inner)
        ctx.calls = inner.calls
        ctx.new_buffers.update({k.removeprefix(PREFIX): v for k, v in inner.new_buffers.items()})
        return out

    def train_loss(self, batches_per_epoch: int) -> Callable[..., Tensor]:
        """``loss(params, hparams, batch, ctx)``: ``training_step(batch, step mod
        batches_per_epoch)``'s loss."""

        def loss(params: Params, hparams: Any, batch: Batch, ctx: StepContext) -> Tensor:
            out = self.call(_training_step, params, batch, ctx.step % batches_per_epoch, ctx)
            if out is None:
                raise HyperdiffError(f"{self.caller}: training_step must return the loss (got "
                                     "None, which a Trainer takes as 'skip this batch'; hyperdiff "
                                     "trains every step)")
            return step_loss(out, self.caller, "training_step", ("loss",))

        return loss

    def val_loss(self, given: Callable[[nn.Module, Batch], Tensor] | None
                 ) -> Callable[..., Tensor]:
        """``loss(params, hparams, batch, ctx)``: ``given(module, batch)`` if given, else
        ``validation_step(batch, 0)``'s ``"val_loss"`` / ``"loss"`` (eval mode)."""
        if given is not None and not callable(given):
            raise HyperdiffError(f"{self.caller}: val_loss must be None or a function "
                                 f"(module, batch) -> scalar tensor (got {describe(given)})")

        def step(module: nn.Module, batch: Batch, batch_idx: int) -> Any:
            if given is not None:
                return given(module, batch)
            return module.validation_step(batch, batch_idx)  # type: ignore[operator]

        def loss(params: Params, hparams: Any, batch: Batch, ctx: StepContext) -> Tensor:
            out = self.call(step, params, batch, 0, ctx)
            name = "val_loss" if given is not None else "validation_step"
            return step_loss(out, self.caller, name, ("val_loss", "loss"))

        return loss


def _training_step(module: nn.Module, batch: Batch, batch_idx: int) -> Any:
    return module.training_step(batch, batch_idx)  # type: ignore[operator]
