"""The inner problem: everything a hypergradient method needs, validated once.

:func:`~hyperdiff.engine.make.make_problem` checks user input at the boundary (types, shapes,
names, data length, scalar losses, hyperparameters that never reach the losses) so that methods
can assume a :class:`Problem` is well formed. Methods are then called as
``method(problem, raw)`` for any raw values.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.data import BatchSource
from hyperdiff.engine.data.random_state import untracked_draws, untracked_states
from hyperdiff.engine.data.replay import fingerprint
from hyperdiff.engine.datacheck import shapes_of
from hyperdiff.engine.device import to_device
from hyperdiff.engine.models import (
    TRAINING_LOSS,
    UNTRACKED_WATCH,
    StepContext,
    replayed_rng,
)
from hyperdiff.engine.optimizers import Optimizer, check_raw_coefficients, working_dtype
from hyperdiff.errors import HyperdiffError, LossError, describe, positive_int, scalar_loss
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.hparams.initialization import initialization_name
from hyperdiff.logs import get_logger
from hyperdiff.typing import Batch, LossFn, Params

_LOG = get_logger("problem")


@dataclass(frozen=True)
class Problem:
    """A validated bilevel problem (see :func:`~hyperdiff.engine.make.make_problem`)."""

    train_loss: LossFn
    val_loss: LossFn
    hparams: HyperParameters
    params: Params
    buffers: Params
    optimizer: Optimizer
    train_data: BatchSource
    val_data: list[Batch]
    steps: int
    seed: int
    train_takes_ctx: bool
    val_takes_ctx: bool

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def initialization(self) -> str | None:
        """The name of the hyperparameter training starts from (``hd.initialization``), if
        any: theta_0 is then its value, not :attr:`params`, which give names, shapes and
        dtypes only."""
        return initialization_name(self.hparams)

    @property
    def num_params(self) -> int:
        return sum(int(p.numel()) for p in self.params.values())

    @property
    def hparam_dtype(self) -> torch.dtype:
        """dtype of hyperparameter values: the parameters' dtype, at least float32 (a bf16 or
        fp16 model still sees lr 0.05, not its bf16 rounding 0.0498): the dtype its optimizer
        updates in (:func:`~hyperdiff.engine.optimizers.working_dtype`)."""
        return working_dtype(next(iter(self.params.values())))

    def raw_tensors(self, raw: dict[str, Tensor] | None = None, *,
                    check: bool = True) -> dict[str, Tensor]:
        """Raw values (default: the collection's current ones; a ``HyperParameters``: its
        ``raw``) on the parameters' device, in :attr:`hparam_dtype`. Given values are checked
        against the optimizer's coefficient ranges (a schedule over all its steps), unless
        ``check=False``: a per-step read of values a hypergradient call has checked already."""
        values = self.hparams.raw if raw is None else self._checked_raw(raw)
        if raw is not None and check:  # the collection's own were checked by make_problem
            check_raw_coefficients(self.optimizer, self.hparams, values, self.hparam_dtype,
                                   params=self.params, steps=self.steps)
        return {n: v.detach().to(device=self.device, dtype=self.hparam_dtype)
                for n, v in values.items()}

    def _checked_raw(self, raw: Any) -> dict[str, Tensor]:
        """``raw`` as a dict of raw tensors with the problem's names and shapes, else the
        standard error (a missing key, a list or a spec was a KeyError or AttributeError from
        inside training)."""
        if isinstance(raw, HyperParameters):  # e.g. hd.tuned_hparams(...): its raw values
            raw = raw.raw
        want = self.hparams.raw
        ok = isinstance(raw, dict) and set(raw) == set(want) and all(
            isinstance(raw[n], Tensor) and raw[n].shape == want[n].shape for n in want)
        if not ok:
            shapes = {n: tuple(v.shape) for n, v in want.items()}
            got = ({n: tuple(v.shape) if isinstance(v, Tensor) else describe(v)
                    for n, v in raw.items()} if isinstance(raw, dict) else describe(raw))
            raise HyperdiffError(
                f"hypergradient: raw must be a dict name -> raw tensor of the problem's "
                f"hyperparameters, shaped {shapes} (got {got}); pass hparams.raw, or a "
                "HyperParameters such as hd.tuned_hparams(...)")
        return raw

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Problem:
        """A copy on ``device`` (floating-point tensors cast to ``dtype`` if given): params,
        buffers, validation batches, and training batches as they are read (see
        :mod:`hyperdiff.engine.device`)."""

        return to_device(self, device, dtype)

    def with_steps(self, steps: int) -> Problem:
        """This problem with ``steps`` inner steps T (a positive int), everything else kept."""
        return replace(self, steps=positive_int("Problem", "steps", steps))


CONTEXT_FLAG = "__hyperdiff_takes_context__"


def with_context(fn: LossFn, takes_context: bool = True) -> LossFn:
    """Mark a loss as receiving the :class:`StepContext` as its fourth positional argument
    (``takes_context=False``: never), overriding the rule of :func:`takes_context`.

    >>> import hyperdiff as hd
    >>> loss = hd.with_context(lambda p, h, b, ctx=None: p["w"].sum())
    >>> hd.engine.problem.takes_context(loss, "train_loss")
    True
    """
    if not callable(fn):
        raise HyperdiffError(f"with_context: fn must be a callable loss (got {describe(fn)})")
    if not isinstance(takes_context, bool):
        raise HyperdiffError(
            f"with_context: takes_context must be True or False (got {describe(takes_context)})"
        )
    try:
        setattr(fn, CONTEXT_FLAG, takes_context)
        return fn
    except (AttributeError, TypeError):  # a bound method or builtin: wrap it

        def marked(*args: Any) -> Any:
            return fn(*args)

        setattr(marked, CONTEXT_FLAG, takes_context)
        return marked


def takes_context(fn: LossFn, name: str, caller: str = "hypergradient") -> bool:
    """True for ``fn(params, hparams, batch, ctx)``, False for ``fn(params, hparams, batch)``.

    The rule counts *required* positional parameters (those without a default): four means
    the loss receives the context, three that it does not; optional ones never receive it, so
    ``loss(params, h, batch, lam=0.1)`` keeps its ``lam``. A loss marked by
    :func:`with_context` is called as marked. More than four required arguments, required
    keyword-only arguments, or fewer than three positional ones are errors, named as
    ``caller``'s (``"make_problem"`` for :func:`~hyperdiff.engine.make.make_problem`). An
    ``nn.Module`` is judged by its ``forward``: ``nn.CrossEntropyLoss()`` takes
    ``(input, target)``, not a loss's three arguments.
    """
    if not callable(fn):
        raise HyperdiffError(
            f"{caller}: {name} must be a callable loss(params, hparams, batch[, ctx]) "
            f"(got {type(fn).__name__})"
        )
    marked = getattr(fn, CONTEXT_FLAG, None)
    if isinstance(marked, bool):
        return marked
    try:  # a module is called as module(*args): its forward's signature is the loss's
        sig = inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn)
    except (TypeError, ValueError):
        return False
    values = list(sig.parameters.values())
    positional = [p for p in values if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    keyword_only = [p.name for p in values if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if keyword_only:
        raise HyperdiffError(
            f"{caller}: {name} must not have required keyword-only arguments, hyperdiff "
            f"passes (params, hparams, batch[, ctx]) by position (got {keyword_only})"
        )
    if len(required) > 4:
        raise HyperdiffError(
            f"{caller}: {name} must have 3 required arguments (params, hparams, batch) or "
            f"4 (params, hparams, batch, ctx); give the others defaults (got {len(required)} "
            f"required: {', '.join(required)})"
        )
    if any(p.kind == p.VAR_POSITIONAL for p in values):
        return len(required) == 4
    if len(positional) < 3:
        got = (f"a {type(fn).__name__} module whose forward takes {len(positional)} "
               "arguments; wrap it, e.g. lambda p, h, b: loss_fn(net(p, b[0]), b[1])"
               if isinstance(fn, torch.nn.Module) else
               f"a function of {len(positional)} arguments")
        raise HyperdiffError(
            f"{caller}: {name} must accept (params, hparams, batch) or "
            f"(params, hparams, batch, ctx) (got {got})"
        )
    return len(required) == 4


def call_loss(
    problem: Problem, which: str, params: Params, hview: Any, batch: Batch, ctx: StepContext
) -> Tensor:
    """Evaluate the train or validation loss, with a clear error if it misbehaves; randomness
    it draws from the global generators is seeded by ``(ctx.seed, ctx.step)``
    (:func:`~hyperdiff.engine.models.replayed_rng`)."""
    fn = problem.train_loss if which == "train_loss" else problem.val_loss
    takes_ctx = problem.train_takes_ctx if which == "train_loss" else problem.val_takes_ctx
    token = TRAINING_LOSS.set(ctx.train and which == "train_loss")
    watched = UNTRACKED_WATCH.get()
    before = untracked_states() if watched else None
    printed = fingerprint(batch) if watched else None
    try:
        with replayed_rng(ctx, params, batch):
            loss = fn(params, hview, batch, ctx) if takes_ctx else fn(params, hview, batch)
    except HyperdiffError:
        raise
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError, AttributeError) as err:
        raise LossError(_loss_failure(which, params, hview, batch, ctx, err)) from err
    finally:
        TRAINING_LOSS.reset(token)
    moved = [] if before is None else untracked_draws(before)
    if moved:
        raise HyperdiffError(
            f"hypergradient: {which} must draw its randomness from torch (torch.rand, "
            f"torch.randn_like, F.dropout: seeded per step, so every replay of training draws "
            f"the same) (got draws from {' and '.join(moved)}, which a replay would not "
            "repeat, so finite differences, checkpointed segments and repeated trainings "
            "would see other values)")
    if printed is not None and fingerprint(batch) != printed:
        raise HyperdiffError(
            f"hypergradient: {which} must not modify its batch in place (got a batch whose "
            "values changed during the call, so every replay of training would see other data); "
            "compute new tensors instead, e.g. x = x * 2 rather than x.mul_(2)")
    return scalar_loss("hypergradient", which, loss)


@contextlib.contextmanager
def watching_untracked_randomness() -> Iterator[None]:
    """While active, :func:`call_loss` refuses a loss that draws from Python's or NumPy's
    global generator (:data:`~hyperdiff.engine.models.UNTRACKED_WATCH`) or changes its batch in
    place (an in-memory batch is the same tensors at every step, so no replay would match)."""
    token = UNTRACKED_WATCH.set(True)
    try:
        yield
    finally:
        UNTRACKED_WATCH.reset(token)


def _loss_failure(which: str, params: Params, hview: Any, batch: Batch, ctx: StepContext,
                  err: Exception) -> str:
    """The message of a loss that raised ``err``: where, on what shapes, and its own text."""
    where = (f"at step {ctx.step} (seed {ctx.seed})" if which == "train_loss"
             else "on a validation batch")
    shown = list(params.items())[:6]
    shapes = ", ".join(f"{n} {tuple(v.shape)}" for n, v in shown)
    more = f", ... ({len(params)} in all)" if len(params) > len(shown) else ""
    kinds = sorted({f"{str(v.dtype).removeprefix('torch.')} on {v.device}"
                    for v in params.values()})
    more += f"; {'/'.join(kinds)}"
    hshapes = {n: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
               for n, v in hview.items()}  # a discrete one is read as a Choice
    return (f"hypergradient: {which} raised {type(err).__name__} {where}: {err} (batch: "
            f"{shapes_of(batch)}; parameters: {shapes}{more}; hyperparameters: {hshapes})")


def sum_in_order(values: Sequence[Tensor]) -> Tensor:
    """``values[0] + values[1] + ...`` (left to right; at least one value)."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total
