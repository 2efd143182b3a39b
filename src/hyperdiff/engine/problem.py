"""The inner problem: everything a hypergradient method needs, validated once.

:func:`make_problem` checks user input at the boundary (types, shapes, names, data length,
scalar losses, hyperparameters that never reach the losses) so that methods can assume it is
well formed. Methods are then called as ``method(problem, raw)`` for any raw values.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.data import BatchSource, as_source, validation_batches
from hyperdiff.engine.datacheck import check_batch, check_source, shapes_of
from hyperdiff.engine.models import StepContext, replayed_rng
from hyperdiff.engine.optimizers import Optimizer, working_dtype
from hyperdiff.errors import HyperdiffError, describe, nonnegative_int, positive_int, scalar_loss
from hyperdiff.hparams.constraints import natural_range
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.logs import get_logger
from hyperdiff.typing import Batch, LossFn, Params

_LOG = get_logger("problem")


@dataclass(frozen=True)
class Problem:
    """A validated bilevel problem (see :func:`make_problem`)."""

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
    def num_params(self) -> int:
        return sum(int(p.numel()) for p in self.params.values())

    @property
    def hparam_dtype(self) -> torch.dtype:
        """dtype of hyperparameter values: the parameters' dtype, at least float32 (a bf16 or
        fp16 model still sees lr 0.05, not its bf16 rounding 0.0498): the dtype its optimizer
        updates in (:func:`~hyperdiff.engine.optimizers.working_dtype`)."""
        return working_dtype(next(iter(self.params.values())))

    def raw_tensors(self, raw: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Raw values (default: the collection's current ones) on the parameters' device, in
        :attr:`hparam_dtype`."""
        values = self.hparams.raw if raw is None else raw
        return {n: v.detach().to(device=self.device, dtype=self.hparam_dtype)
                for n, v in values.items()}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Problem:
        """A copy on ``device`` (floating-point tensors cast to ``dtype`` if given): params,
        buffers, validation batches, and training batches as they are read (see
        :mod:`hyperdiff.engine.device`)."""
        from hyperdiff.engine.device import (
            to_device,  # local: device imports this module's names lazily
        )

        return to_device(self, device, dtype)

    def with_steps(self, steps: int) -> Problem:
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


def takes_context(fn: LossFn, name: str) -> bool:
    """True for ``fn(params, hparams, batch, ctx)``, False for ``fn(params, hparams, batch)``.

    The rule counts *required* positional parameters (those without a default): four means
    the loss receives the context, three that it does not; optional ones never receive it, so
    ``loss(params, h, batch, lam=0.1)`` keeps its ``lam``. A loss marked by
    :func:`with_context` is called as marked. More than four required arguments, required
    keyword-only arguments, or fewer than three positional ones are errors.
    """
    if not callable(fn):
        raise HyperdiffError(
            f"hypergradient: {name} must be a callable loss(params, hparams, batch[, ctx]) "
            f"(got {type(fn).__name__})"
        )
    marked = getattr(fn, CONTEXT_FLAG, None)
    if isinstance(marked, bool):
        return marked
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    values = list(sig.parameters.values())
    positional = [p for p in values if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    keyword_only = [p.name for p in values if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if keyword_only:
        raise HyperdiffError(
            f"hypergradient: {name} must not have required keyword-only arguments, hyperdiff "
            f"passes (params, hparams, batch[, ctx]) by position (got {keyword_only})"
        )
    if len(required) > 4:
        raise HyperdiffError(
            f"hypergradient: {name} must have 3 required arguments (params, hparams, batch) or "
            f"4 (params, hparams, batch, ctx); give the others defaults (got {len(required)} "
            f"required: {', '.join(required)})"
        )
    if any(p.kind == p.VAR_POSITIONAL for p in values):
        return len(required) == 4
    if len(positional) < 3:
        raise HyperdiffError(
            f"hypergradient: {name} must accept (params, hparams, batch) or "
            f"(params, hparams, batch, ctx) (got a function of {len(positional)} arguments)"
        )
    return len(required) == 4


def _check_params(params: Any, name: str) -> Params:
    if isinstance(params, torch.nn.Module):
        raise HyperdiffError(
            f"hypergradient: {name} must be a dict of tensors; for a module use "
            "hd.functional(module).params"
        )
    if not isinstance(params, dict) or not params:
        raise HyperdiffError(
            f"hypergradient: {name} must be a non-empty dict name -> tensor "
            f"(got {describe(params)})"
        )
    devices = {v.device for v in params.values() if isinstance(v, Tensor)}
    if len(devices) > 1:
        raise HyperdiffError(
            f"hypergradient: {name} must live on one device (got {sorted(map(str, devices))}); "
            "move them together, e.g. with problem.to(device)"
        )
    out = {}
    for key, value in params.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise HyperdiffError(
                f"hypergradient: {name}[{key!r}] must be a floating-point tensor "
                f"(got {describe(value)})"
            )
        if isinstance(value, torch.nn.Parameter) and not value.requires_grad:
            raise HyperdiffError(
                f"hypergradient: {name}[{key!r}] must be a parameter to train (got a frozen "
                "nn.Parameter, requires_grad=False); leave frozen parameters out, as "
                "hd.functional(module).params does: the forward pass reads them from the module"
            )
        if not torch.isfinite(value).all():
            raise HyperdiffError(f"hypergradient: {name}[{key!r}] must be finite (got NaN or inf)")
        out[key] = value.detach().clone()
    dtypes = {v.dtype for v in out.values()}
    if len(dtypes) > 1:
        raise HyperdiffError(
            f"hypergradient: {name} must share one dtype (got {sorted(map(str, dtypes))})"
        )
    return out


def make_problem(
    train_loss: LossFn,
    val_loss: LossFn,
    hparams: HyperParameters,
    params: Params,
    *,
    optimizer: Optimizer,
    train_data: Any,
    val_data: Any,
    steps: int,
    buffers: Params | None = None,
    seed: int = 0,
    probe: bool = True,
) -> Problem:
    """Validate the inputs and return a :class:`Problem`.

    With ``probe=True`` two differentiable training steps are run once to check that the losses
    return scalars and to warn about hyperparameters whose hypergradient is identically zero.
    """
    if not isinstance(hparams, HyperParameters):
        raise HyperdiffError(
            f"hypergradient: hparams must be a hd.HyperParameters (got {type(hparams).__name__})"
        )
    if not isinstance(optimizer, Optimizer):
        raise HyperdiffError(
            "hypergradient: optimizer must be made by hd.sgd, hd.adam or hd.adamw "
            f"(got {type(optimizer).__name__})"
        )
    steps = positive_int("hypergradient", "steps", steps)
    seed = nonnegative_int("hypergradient", "seed", seed)
    params = _check_params(params, "params")
    buffers = {} if buffers is None else _check_params(buffers, "buffers") if buffers else {}
    for coef_name, coef in optimizer.coefficients.items():
        if isinstance(coef, str):
            if coef not in hparams:
                raise HyperdiffError(
                    f"hypergradient: optimizer coefficient {coef_name}={coef!r} must name a "
                    f"hyperparameter, one of {list(hparams)}"
                )
            spec = hparams[coef]
            if spec.kind == "per_step" and spec.shape[0] < steps:
                raise HyperdiffError(
                    f"hypergradient: per_step hyperparameter {coef!r} must have at least "
                    f"steps={steps} entries (got {spec.shape[0]})"
                )
            if spec.kind in ("per_tensor", "per_element") and set(spec.param_names) != set(params):
                raise HyperdiffError(
                    f"hypergradient: {spec.kind} hyperparameter {coef!r} must be defined over "
                    f"the trained parameters {list(params)} (got {list(spec.param_names)})"
                )
            if spec.kind == "per_element" and spec.param_shapes != tuple(
                    tuple(params[n].shape) for n in spec.param_names):
                raise HyperdiffError(
                    f"hypergradient: per_element hyperparameter {coef!r} must have the shapes of "
                    f"the trained parameters "
                    f"{ {n: tuple(params[n].shape) for n in spec.param_names} } "
                    f"(got {dict(zip(spec.param_names, spec.param_shapes, strict=True))})"
                )
            if spec.kind in ("categorical", "integer", "boolean"):
                raise HyperdiffError(
                    f"hypergradient: optimizer coefficient {coef_name}={coef!r} must be a "
                    f"continuous hyperparameter (got the discrete {spec.kind} {coef!r}; read it "
                    "in the loss with hd.choose)"
                )
            if spec.kind == "per_feature":
                raise HyperdiffError(
                    f"hypergradient: optimizer coefficient {coef_name}={coef!r} must be a scalar, "
                    "per_step, per_tensor or per_element hyperparameter (got per_feature)"
                )
            _check_coefficient_values(optimizer, coef_name, coef, hparams)
    problem = Problem(
        train_loss=train_loss,
        val_loss=val_loss,
        hparams=hparams,
        params=params,
        buffers=buffers,
        optimizer=optimizer,
        train_data=as_source(train_data, "train_data"),
        val_data=validation_batches(val_data),
        steps=steps,
        seed=seed,
        train_takes_ctx=takes_context(train_loss, "train_loss"),
        val_takes_ctx=takes_context(val_loss, "val_loss"),
    )
    problem.train_data.check(steps, seed)
    check_source("hypergradient", "train_data", problem.train_data, seed)
    for i, batch in enumerate(problem.val_data):
        check_batch("hypergradient", "val_data" if len(problem.val_data) == 1 else
                    f"val_data[{i}]", batch)
    if probe:
        _probe(problem)
    return problem


def _check_coefficient_values(
    optimizer: Optimizer, coef_name: str, hparam: str, hparams: HyperParameters
) -> None:
    """The current values of a hyperparameter that is an optimizer coefficient must be valid
    for it (``sgd`` momentum >= 0, ``adam`` betas in [0, 1), ...); warn when its constraint
    lets the outer loop move it out of that range."""
    valid = optimizer.valid.get(coef_name)
    if valid is None:
        return
    values = hparams.natural()[hparam]
    ok = valid.tensor_contains(values)
    if not bool(ok.all()):
        bad = values[~ok].reshape(-1)[:3].tolist()
        raise HyperdiffError(
            f"hypergradient: hyperparameter {hparam!r}, the {optimizer.name} {coef_name}, "
            f"must be {valid.text()} (got {bad})"
        )
    low, high = natural_range(hparams[hparam].constraint)
    inside = (valid.low is None or (low is not None and low >= valid.low)) and (
        valid.high is None or (high is not None and high <= valid.high))
    if not inside:
        _LOG.warning(
            "hypergradient: hyperparameter %r, the %s %s, has a %s constraint that lets "
            "tuning move it outside its valid values (%s); constrain it, e.g. "
            "hd.scalar(value, (low, high))",
            hparam, optimizer.name, coef_name, hparams[hparam].constraint.name, valid.text(),
        )


def call_loss(
    problem: Problem, which: str, params: Params, hview: Any, batch: Batch, ctx: StepContext
) -> Tensor:
    """Evaluate the train or validation loss, with a clear error if it misbehaves; randomness
    it draws from the global generators is seeded by ``(ctx.seed, ctx.step)``
    (:func:`~hyperdiff.engine.models.replayed_rng`)."""
    fn = problem.train_loss if which == "train_loss" else problem.val_loss
    takes_ctx = problem.train_takes_ctx if which == "train_loss" else problem.val_takes_ctx
    with replayed_rng(ctx, params, batch):
        loss = fn(params, hview, batch, ctx) if takes_ctx else fn(params, hview, batch)
    return scalar_loss("hypergradient", which, loss)


def _probe(problem: Problem) -> None:
    from hyperdiff.engine.training import (  # local: training imports problem
        train_step,
        validation_loss,
    )

    raw = {n: v.requires_grad_() for n, v in problem.raw_tensors().items()}
    hview = problem.hparams.view(raw)
    params = {k: v.requires_grad_() for k, v in problem.params.items()}
    buffers, opt_state = dict(problem.buffers), problem.optimizer.init(params)
    try:
        moves_params = _train_loss_depends_on_params(problem, params, hview)
        losses = []
        for step in range(min(2, problem.steps)):
            params, buffers, opt_state, loss = train_step(
                problem, params, buffers, opt_state, hview, step, differentiable=True
            )
            losses.append(loss)
        losses.append(validation_loss(problem, params, buffers, hview))
    except HyperdiffError:
        raise
    except (RuntimeError, IndexError, TypeError, ValueError) as err:
        raise HyperdiffError(
            "hypergradient: the losses or the optimizer failed on the given data and "
            f"hyperparameters ({_shapes_text(problem, raw)}): {type(err).__name__}: {err}"
        ) from err
    if not moves_params:
        warnings.warn(
            "hypergradient: train_loss does not depend on the parameters (its gradient with "
            f"respect to every one of {list(problem.params)} is structurally zero), so "
            "training never moves them; check that train_loss uses params",
            stacklevel=3,
        )
    grads = torch.autograd.grad(sum_in_order(losses), list(raw.values()), allow_unused=True)
    unused = [n for n, g in zip(raw, grads, strict=True)  # REINFORCE logits: estimated apart
              if g is None and getattr(problem.hparams[n], "mode", None) != "reinforce"]
    for name in unused:
        reason = (
            "the validation loss: train_loss does not depend on the parameters, so training "
            "cannot carry it there" if not moves_params else "the losses or the optimizer"
        )
        warnings.warn(
            f"hypergradient: hyperparameter {name!r} never reaches {reason}; "
            "its hypergradient is identically zero",
            stacklevel=3,
        )


def _train_loss_depends_on_params(problem: Problem, params: Params, hview: Any) -> bool:
    """Whether the train loss of step 0 is connected to at least one parameter."""
    batch = problem.train_data.batch(0, problem.seed)
    ctx = StepContext(step=0, seed=problem.seed, train=True, buffers=dict(problem.buffers))
    with torch.enable_grad():
        loss = call_loss(problem, "train_loss", params, hview, batch, ctx)
        if not loss.requires_grad:
            return False
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return any(g is not None for g in grads)


def _shapes_text(problem: Problem, raw: dict[str, Tensor]) -> str:
    """Shapes of everything a loss sees, for errors: hyperparameters, parameters, data."""
    hshapes = {n: tuple(v.shape) for n, v in raw.items()}
    pshapes = {n: tuple(v.shape) for n, v in problem.params.items()}
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in problem.params.values()})
    return (
        f"hyperparameter shapes {hshapes}; parameter shapes {pshapes} "
        f"({'/'.join(dtypes)} on {problem.device}); train batch of step 0: "
        f"{shapes_of(problem.train_data.batch(0, problem.seed))}; validation batch: "
        f"{shapes_of(problem.val_data[0])}"
    )


def sum_in_order(values: Sequence[Tensor]) -> Tensor:
    """``values[0] + values[1] + ...`` (left to right; at least one value)."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total
