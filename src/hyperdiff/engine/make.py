"""Build a :class:`~hyperdiff.engine.problem.Problem` from user input, validated once.

:func:`make_problem` checks user input at the boundary (types, shapes, names, data length,
scalar losses, hyperparameters that never reach the losses) so that methods can assume it is
well formed; its probe runs two training steps (:mod:`hyperdiff.engine.training`), which is
why it lives above the problem and training modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.data import (
    as_source,
    validation_batches,
)
from hyperdiff.engine.datacheck import check_batch, check_source, shapes_of, tensors_in
from hyperdiff.engine.device import FLOAT_DTYPES, FLOAT_DTYPES_TEXT, held_batches, resolve_device
from hyperdiff.engine.models import FunctionalModel, StepContext, model_state
from hyperdiff.engine.optimizers import (
    Optimizer,
    check_callables,
    check_coefficient_values,
    check_number_coefficients,
    check_schedule,
    working_dtype,
)
from hyperdiff.engine.problem import (
    Problem,
    call_loss,
    sum_in_order,
    takes_context,
    watching_untracked_randomness,
)
from hyperdiff.engine.training import initial_state, train_step, validation_loss
from hyperdiff.errors import (
    HyperdiffError,
    LossError,
    describe,
    fail,
    nonnegative_int,
    positive_int,
)
from hyperdiff.hparams.discrete import discrete_names, with_states
from hyperdiff.hparams.hyperparams import HyperParameters, check_representable
from hyperdiff.hparams.initialization import check_matches, initialization_name
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.logs import get_logger
from hyperdiff.typing import LossFn, Params

_LOG = get_logger("problem")  # the problem's warnings, under the problem's logger


def _check_params(params: Any, name: str, caller: str) -> Params:
    if isinstance(params, torch.nn.Module):
        raise HyperdiffError(
            f"{caller}: {name} must be a dict of tensors; for a module use "
            "hd.functional(module).params"
        )
    if not isinstance(params, dict) or not params:
        raise HyperdiffError(
            f"{caller}: {name} must be a non-empty dict name -> tensor "
            f"(got {describe(params)})"
        )
    devices = {v.device for v in params.values() if isinstance(v, Tensor)}
    if len(devices) > 1:
        raise HyperdiffError(
            f"{caller}: {name} must live on one device (got {sorted(map(str, devices))}); "
            "move them together, e.g. with problem.to(device)"
        )
    for key, value in params.items():
        if isinstance(value, Tensor):
            _check_device(f"{name}[{key!r}]", value, caller)
    out = {}
    for key, value in params.items():
        if isinstance(value, Tensor) and value.layout != torch.strided:  # isfinite, clone, ...
            raise HyperdiffError(  # have no sparse kernels: a NotImplementedError from torch
                f"{caller}: {name}[{key!r}] must be a dense (strided) tensor (got layout "
                f"{str(value.layout).removeprefix('torch.')}); convert it with .to_dense()"
            )
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise HyperdiffError(
                f"{caller}: {name}[{key!r}] must be a floating-point tensor "
                f"(got {describe(value)})"
            )
        if value.dtype not in FLOAT_DTYPES:  # float8: no arithmetic (isfinite, promotion)
            raise HyperdiffError(
                f"{caller}: {name}[{key!r}] must be a tensor of dtype {FLOAT_DTYPES_TEXT} "
                f"(got {value.dtype}); train in one of those and cast when exporting"
            )
        if isinstance(value, torch.nn.Parameter) and not value.requires_grad:
            raise HyperdiffError(
                f"{caller}: {name}[{key!r}] must be a parameter to train (got a frozen "
                "nn.Parameter, requires_grad=False); leave frozen parameters out, as "
                "hd.functional(module).params does: the forward pass reads them from the module"
            )
        if not torch.isfinite(value).all():
            raise HyperdiffError(f"{caller}: {name}[{key!r}] must be finite (got NaN or inf)")
        out[key] = value.detach().clone()
    dtypes = {v.dtype for v in out.values()}
    if len(dtypes) > 1:
        raise HyperdiffError(
            f"{caller}: {name} must share one dtype (got {sorted(map(str, dtypes))})"
        )
    return out


def _check_buffer_dtype(params: Params, buffers: Params, caller: str) -> None:
    """Buffers (BatchNorm running statistics) must have the parameters' dtype: a float32
    running mean in a float64 model fails inside the model's forward pass."""
    if not buffers:
        return
    have = next(iter(buffers.values())).dtype
    want = next(iter(params.values())).dtype
    if have != want:
        name = str(want).removeprefix("torch.")
        raise HyperdiffError(
            f"{caller}: buffers must have the parameters' dtype (got "
            f"{str(have).removeprefix('torch.')} vs {name}); cast them together, e.g. "
            f"{{k: v.to(torch.{name}) for k, v in buffers.items()}}, or build the problem in "
            "the module's dtype and use problem.to(dtype)"
        )


def _check_device(where: str, tensor: Tensor, caller: str) -> None:
    """Refuse a tensor on a device hyperdiff does not run on (``"meta"``, ``"xla"``, ...),
    whose data the checks below cannot read."""
    if tensor.device.type not in ("cpu", "cuda", "mps"):
        resolve_device(tensor.device, caller, f"the device of {where}")


def _check_data_devices(problem: Problem, caller: str) -> None:
    """:func:`_check_device` over the held train batches and the validation batches."""
    for name, batches in (("train_data", held_batches(problem.train_data)),
                          ("val_data", problem.val_data)):
        for i, batch in enumerate(batches):
            which = name if len(batches) == 1 else f"{name}[{i}]"
            for label, tensor in tensors_in(batch):
                _check_device(label.replace("batch", which, 1), tensor, caller)


def make_problem(
    train_loss: LossFn,
    val_loss: LossFn,
    hparams: HyperParameters,
    params: Params | FunctionalModel | tuple[Params, Params],
    *,
    optimizer: Optimizer,
    train_data: Any,
    val_data: Any,
    steps: int,
    buffers: Params | None = None,
    seed: int = 0,
    probe: bool = True,
    caller: str = "make_problem",
) -> Problem:
    """Validate the inputs and return a :class:`Problem`.

    ``params`` takes the model forms of :func:`hyperdiff.hypergradient` (see
    :func:`hyperdiff.engine.models.model_state`): a :func:`functional` model, a dict name ->
    tensor (with ``buffers``) or a pair ``(params, buffers)``.

    With ``probe=True`` two differentiable training steps are run once to check that the losses
    return scalars and to warn about hyperparameters whose hypergradient is identically zero.

    ``caller`` names the entry point in messages (``"<caller>: <argument> must be ..."``):
    ``hd.hypergradient`` passes ``"hypergradient"``, a task its name.
    """
    if not isinstance(caller, str) or not caller:
        raise fail("make_problem", "caller", "a non-empty str naming the entry point", caller)
    if not isinstance(hparams, HyperParameters):
        raise HyperdiffError(
            f"{caller}: hparams must be a hd.HyperParameters (got {type(hparams).__name__})"
        )
    if not isinstance(optimizer, Optimizer):
        raise HyperdiffError(
            f"{caller}: optimizer must be made by hd.sgd, hd.adam or hd.adamw "
            f"(got {type(optimizer).__name__})"
        )
    steps = positive_int(caller, "steps", steps)
    seed = nonnegative_int(caller, "seed", seed)
    params, buffers = model_state(caller, params, buffers, "params")
    params = _check_params(params, "params", caller)
    buffers = _check_params(buffers, "buffers", caller) if buffers else {}
    _check_buffer_dtype(params, buffers, caller)
    start = initialization_name(hparams)
    if start is not None:
        check_matches(hparams[start], start, params)
    check_schedule_prefixes(caller, optimizer.coefficients)
    for coef_name, coef in optimizer.coefficients.items():
        if isinstance(coef, Schedule) and coef.steps != steps:
            raise HyperdiffError(
                f"{caller}: the {coef.family} schedule of {coef_name} must be defined over "
                f"the run's steps={steps} (got {coef.steps}: "
                + ("its later part would never train, and its hyperparameters that shape it "
                   "would get no gradient from it" if coef.steps > steps else
                   "it ends before the run") + f"); use schedule.with_steps({steps})")
        if isinstance(coef, Schedule):
            check_schedule(optimizer, coef_name, coef, hparams)
        if isinstance(coef, str):
            if coef not in hparams:
                raise HyperdiffError(
                    f"{caller}: optimizer coefficient {coef_name}={coef!r} must name a "
                    f"hyperparameter, one of {list(hparams)}"
                )
            spec = hparams[coef]
            if spec.kind == "per_step" and spec.shape[0] != steps:
                raise HyperdiffError(
                    f"{caller}: per_step hyperparameter {coef!r} must have one entry per "
                    f"step, steps={steps} (got {spec.shape[0]}"
                    + ("; the entries past the run would never train, get an exact 0 "
                       "hypergradient and enter its reports and exports" if
                       spec.shape[0] > steps else "") + "); make it with hd.per_step(steps, "
                    "...), or stretch tuned values with hd.schedules.resample(values, steps)")
            if spec.kind in ("per_tensor", "per_element") and set(spec.param_names) != set(params):
                raise HyperdiffError(
                    f"{caller}: {spec.kind} hyperparameter {coef!r} must be defined over "
                    f"the trained parameters {list(params)} (got {list(spec.param_names)})"
                )
            if spec.kind == "per_element" and spec.param_shapes != tuple(
                    tuple(params[n].shape) for n in spec.param_names):
                raise HyperdiffError(
                    f"{caller}: per_element hyperparameter {coef!r} must have the shapes of "
                    f"the trained parameters "
                    f"{ {n: tuple(params[n].shape) for n in spec.param_names} } "
                    f"(got {dict(zip(spec.param_names, spec.param_shapes, strict=True))})"
                )
            if spec.kind in ("categorical", "integer", "boolean"):
                raise HyperdiffError(
                    f"{caller}: optimizer coefficient {coef_name}={coef!r} must be a "
                    f"continuous hyperparameter (got the discrete {spec.kind} {coef!r}; read it "
                    "in the loss with hd.choose)"
                )
            if spec.kind in ("per_feature", "initialization"):
                raise HyperdiffError(
                    f"{caller}: optimizer coefficient {coef_name}={coef!r} must be a scalar, "
                    f"per_step, per_tensor or per_element hyperparameter (got {spec.kind})"
                )
            check_coefficient_values(optimizer, coef_name, coef, hparams,
                                      working_dtype(next(iter(params.values()))))
    _check_parameter_kinds(caller, hparams, params)
    check_number_coefficients(optimizer, working_dtype(next(iter(params.values()))))
    check_representable(hparams, working_dtype(next(iter(params.values()))), caller)
    # a direct call's straight-through Gumbel noise follows the problem's seed (the outer
    # loops seed it per step and sample): it was seed 0's whatever the seed
    hparams = with_states(hparams, {n: {"noise_seed": seed} for n in discrete_names(hparams)})
    problem = Problem(
        train_loss=train_loss,
        val_loss=val_loss,
        hparams=hparams,
        params=params,
        buffers=buffers,
        optimizer=optimizer,
        train_data=as_source(train_data, "train_data"),
        val_data=validation_batches(val_data, caller),
        steps=steps,
        seed=seed,
        train_takes_ctx=takes_context(train_loss, "train_loss", caller),
        val_takes_ctx=takes_context(val_loss, "val_loss", caller),
    )
    problem.train_data.check(steps, seed)
    _check_data_devices(problem, caller)
    check_source(caller, "train_data", problem.train_data, seed)
    for i, batch in enumerate(problem.val_data):
        check_batch(caller, "val_data" if len(problem.val_data) == 1 else
                    f"val_data[{i}]", batch)
    if probe:
        _probe(problem, caller)
    return problem


def check_schedule_prefixes(caller: str, coefficients: Mapping[str, Any]) -> None:
    """Refuse two coefficients whose ``hd.schedule`` read a hyperparameter of the same name
    (two schedules left at the default ``prefix="lr"``: the second would silently read the
    first's ``lr_peak`` and ``lr_final``).

    >>> import hyperdiff as hd
    >>> check_schedule_prefixes("f", {"lr": hd.schedule("exponential", 5),
    ...                              "weight_decay": hd.schedule("exponential", 5, prefix="wd")})
    """
    readers: dict[str, str] = {}  # hyperparameter name -> the coefficient whose schedule reads it
    for coef_name, coef in coefficients.items():
        if not isinstance(coef, Schedule):
            continue
        names = list(coef.names.values())
        clash = [n for n in names if n in readers]
        if clash:
            other = readers[clash[0]]
            shared = [n for n in clash if readers[n] == other]
            raise HyperdiffError(
                f"{caller}: the schedules of {other} and {coef_name} must read hyperparameters "
                f"of their own (got both reading {shared}, so one coefficient would follow the "
                f"other's values); give each schedule its own prefix, e.g. "
                f"hd.schedule({coef.family!r}, {coef.steps}, prefix={coef_name!r})")
        readers.update(dict.fromkeys(names, coef_name))


def _check_parameter_kinds(caller: str, hparams: HyperParameters, params: Params) -> None:
    """Every ``per_tensor`` and ``per_element`` hyperparameter, read by the optimizer or by a
    loss (``h.at(name, param=...)``), must be made over trained parameters, a per_element
    one with their shapes: another shape would broadcast silently, an unknown name get an
    exact 0 hypergradient."""
    for name, spec in hparams.items():
        if spec.kind not in ("per_tensor", "per_element"):
            continue
        unknown = [n for n in spec.param_names if n not in params]
        if unknown:
            raise HyperdiffError(
                f"{caller}: {spec.kind} hyperparameter {name!r} must be made over trained "
                f"parameters, some of {list(params)} (got unknown {unknown}, whose entries "
                "would never be read and get an exact 0 hypergradient); make it over the "
                "parameters you train, e.g. hd.functional(module).params")
        shapes = spec.param_shapes if spec.kind == "per_element" else ()  # per_tensor: none
        for param, shape in zip(spec.param_names, shapes, strict=False):
            if tuple(shape) != tuple(params[param].shape):
                raise HyperdiffError(
                    f"{caller}: per_element hyperparameter {name!r} must have the shape of "
                    f"parameter {param!r}, {tuple(params[param].shape)} (got "
                    f"{tuple(shape)}, which would broadcast against it); make it over the "
                    "parameters you train")


def _probe(problem: Problem, caller: str) -> None:
    raw = {n: v.requires_grad_() for n, v in problem.raw_tensors().items()}
    hview = problem.hparams.view(raw)
    params, buffers, opt_state = initial_state(problem, hview, differentiable=True)
    stage: int | None = 0  # the training step running, None: the validation loss
    try:
        check_callables(problem.optimizer, hview, problem.params, problem.steps)
        with watching_untracked_randomness():
            moves_params = _train_loss_depends_on_params(problem, params, hview)
            losses = []
            for step in range(min(2, problem.steps)):
                stage = step
                params, buffers, opt_state, loss = train_step(
                    problem, params, buffers, opt_state, hview, step, differentiable=True
                )
                losses.append(loss)
            stage = None
            val = validation_loss(problem, params, buffers, hview)
            losses.append(val)
    except LossError as err:  # at the first steps, the whole picture: every shape and dtype
        cause = err.__cause__ if isinstance(err.__cause__, Exception) else err
        raise HyperdiffError(_probe_failure(problem, raw, cause, stage, caller)) from cause
    except HyperdiffError:
        raise
    except (RuntimeError, IndexError, TypeError, ValueError) as err:
        raise HyperdiffError(_probe_failure(problem, raw, err, stage, caller)) from err
    if not moves_params:
        warnings.warn(
            f"{caller}: train_loss does not depend on the parameters (its gradient with "
            f"respect to every one of {list(problem.params)} is structurally zero), so "
            "training never moves them; check that train_loss uses params",
            stacklevel=3,
        )
    if not val.requires_grad:
        raise HyperdiffError(
            f"{caller}: val_loss must be differentiable in the parameters or the "
            "hyperparameters (got a tensor without a gradient: computed through argmax, "
            "comparisons, .detach(), .item() or torch.no_grad); keep a 0-1 error or an accuracy "
            "as a metric and descend a differentiable loss such as the cross-entropy")
    total = sum_in_order(losses)
    grads = (torch.autograd.grad(total, list(raw.values()), allow_unused=True)
             if total.requires_grad else [None] * len(raw))
    unused = [n for n, g in zip(raw, grads, strict=True)  # REINFORCE logits: estimated apart
              if g is None and getattr(problem.hparams[n], "mode", None) != "reinforce"]
    for name in unused:
        reason = (
            "the validation loss: train_loss does not depend on the parameters, so training "
            "cannot carry it there" if not moves_params else "the losses or the optimizer"
        )
        warnings.warn(
            f"{caller}: hyperparameter {name!r} never reaches {reason}; "
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


def _probe_failure(problem: Problem, raw: dict[str, Tensor], err: Exception,
                   stage: int | None, caller: str) -> str:
    """The probe's error: where it failed (training step ``stage``, or the validation loss
    when ``None``), every shape there, and the error's own text."""
    where = "on the validation data" if stage is None else f"at step {stage}"
    return (f"{caller}: the losses or the optimizer failed {where} on the given data and "
            f"hyperparameters ({_shapes_text(problem, raw, stage)}): {type(err).__name__}: "
            f"{err}")


def _shapes_text(problem: Problem, raw: dict[str, Tensor], stage: int | None) -> str:
    """Shapes of everything a loss sees, for errors: hyperparameters, parameters, data (the
    train batch of step ``stage``, step 0's when the validation loss failed)."""
    hshapes = {n: tuple(v.shape) for n, v in raw.items()}
    pshapes = {n: tuple(v.shape) for n, v in problem.params.items()}
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in problem.params.values()})
    step = 0 if stage is None else stage
    return (
        f"hyperparameter shapes {hshapes}; parameter shapes {pshapes} "
        f"({'/'.join(dtypes)} on {problem.device}); train batch of step {step}: "
        f"{shapes_of(problem.train_data.batch(step, problem.seed))}; validation batch: "
        f"{shapes_of(problem.val_data[0])}"
    )
