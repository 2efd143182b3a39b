"""Tuned values back in torch: ``torch.optim`` param groups, a scheduler, module weights.

- :func:`torch_optimizer` turns an inner optimizer (``hd.sgd`` / ``hd.adam`` / ``hd.adamw``) and
  tuned hyperparameters into a ``torch.optim`` optimizer over a module's parameters (one param
  group per set of tensors that share their coefficients, so per-tensor weight decay becomes
  param groups) and a :class:`TunedSchedule` that sets every scheduled coefficient (a
  ``per_step`` learning rate, a momentum schedule, ...) before each step. Training with the
  pair equals :func:`hyperdiff.testing.train`: bit for bit where the coefficients are plain
  numbers, to rounding otherwise (docs/export.md, "What is bit for bit").
- :func:`hyperdiff.hparams.schedules.resample` stretches a ``per_step`` schedule to another number
  of steps (``torch_optimizer(..., steps=M)`` uses it).
- :func:`load_into` loads trained params and buffers (BatchNorm statistics) into a module, or
  a learned initialisation (``hd.initialization``) from tuned hyperparameters or a result.
- :func:`tuned_hparams` reads tuned values from a result, ``result.json`` or a run directory,
  or one method's best values from ``hyperdiff compare``'s ``comparison.json``.

Usage, after tuning::

    opt, sched = hd.torch_optimizer(hd.sgd("lr", 0.9, weight_decay="wd"), result, model)
    for step in range(steps):
        opt.zero_grad(); loss_fn(model(x[step]), y[step]).backward(); opt.step(); sched.step()
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from hyperdiff.app.tasks import Task, TaskSpec, factory_defaults
from hyperdiff.engine.optimizers import Optimizer, resolve
from hyperdiff.errors import HyperdiffError, describe, is_number, positive_int
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.hparams.initialization import initial_values, initialization_name
from hyperdiff.hparams.schedules import Schedule, resample
from hyperdiff.tuner.history import OptimizeResult
from hyperdiff.tuner.online_plan import OnlineResult

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# inner-optimizer coefficient -> torch.optim param-group key (betas are joined into a pair)
GROUP_KEYS = {
    "sgd": {"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay"},
    "adam": {"lr": "lr", "beta1": "betas", "beta2": "betas", "eps": "eps",
             "weight_decay": "weight_decay"},
}
GROUP_KEYS["adamw"] = GROUP_KEYS["adam"]
Table = dict[str, tuple[float, ...]]  # coefficient -> its value at steps 0 .. S-1
WARMUP_FAMILIES = ("warmup_cosine", "warmup_linear")  # schedules whose step-0 value is 0


def _as_hparams(hparams: Any, caller: str) -> HyperParameters:
    if isinstance(hparams, OptimizeResult):
        return hparams.best_hparams
    if isinstance(hparams, OnlineResult):  # an online run's values: those it ended with
        return hparams.final_hparams
    if isinstance(hparams, HyperParameters):
        return hparams
    raise HyperdiffError(
        f"{caller}: hparams must be a hd.HyperParameters (e.g. result.best_hparams, an online "
        f"run's result.final_hparams, or hd.tuned_hparams(task.hparams, run_dir)) or an "
        f"OptimizeResult (got {describe(hparams)})"
    )


def _named_parameters(module_or_params: Any, caller: str) -> dict[str, Tensor]:
    """The tensors ``torch.optim`` trains: leaf tensors that require grad. Frozen ones
    (``requires_grad=False``) are left out, as ``[p for p in model.parameters() if
    p.requires_grad]`` would leave them out, and as every method of hyperdiff keeps them fixed."""
    named: dict[str, Tensor]
    if isinstance(module_or_params, nn.Module):
        named = dict(module_or_params.named_parameters())
    elif isinstance(module_or_params, Mapping):
        named = dict(module_or_params)
    else:
        raise HyperdiffError(f"{caller}: module_or_params must be a torch.nn.Module or a dict "
                             f"name -> parameter (got {describe(module_or_params)})")
    for name, p in named.items():
        if not isinstance(p, Tensor) or not p.is_leaf:
            raise HyperdiffError(f"{caller}: parameter {name!r} must be a leaf tensor "
                                 f"(got {describe(p)})")
    trainable = {name: p for name, p in named.items() if p.requires_grad}
    first: dict[int, str] = {}
    for name, p in trainable.items():
        if id(p) in first:
            raise HyperdiffError(
                f"{caller}: module_or_params must name each tensor once (got {first[id(p)]!r} "
                f"and {name!r} for one tensor: tied weights, which torch.optim would update "
                "twice per step); pass dict(module.named_parameters()), which names a shared "
                "tensor once, as hd.functional does")
        first[id(p)] = name
    if not trainable:
        raise HyperdiffError(
            f"{caller}: module_or_params must have a parameter that requires grad (got "
            f"{len(named)} frozen ones); frozen parameters are not trained, so there is "
            "nothing to optimize"
        )
    return trainable


def _check_parameter_names(optimizer: Optimizer, hparams: HyperParameters,
                           named: Mapping[str, Tensor]) -> None:
    """Refuse a module whose trainable parameters are not the tensors that a ``per_tensor``
    hyperparameter read by a coefficient was defined over (another architecture, or other
    parameters frozen): the coefficient has no value for an unexpected tensor and would
    leave a missing one untrained."""
    for coef_name, coef in optimizer.coefficients.items():
        if not isinstance(coef, str) or coef not in hparams or hparams[coef].kind != "per_tensor":
            continue
        expected = list(hparams[coef].param_names)
        missing = [n for n in expected if n not in named]
        unexpected = [n for n in named if n not in expected]
        if missing or unexpected:
            raise HyperdiffError(
                f"torch_optimizer: module_or_params must have as trainable parameters the "
                f"tensors that hyperparameter {coef!r} (per_tensor, coefficient {coef_name}) was "
                f"defined over, {expected} (got {list(named)}: missing {missing}, unexpected "
                f"{unexpected}); pass the module that was tuned, with the same parameters "
                "frozen (requires_grad=False), as the hyperparameters were defined over "
                "hd.functional(model).params")


def _refuse_one_step_warmup(optimizer: Optimizer, horizon: int, steps: int | None) -> None:
    """Refuse a warmup schedule exported over one step: its one value is its step-0 value, 0
    (the ramp starts at 0), which the scheduler would hold for every step: the model would
    never train."""
    if horizon != 1:
        return
    for coef_name, coef in optimizer.coefficients.items():
        if isinstance(coef, Schedule) and coef.family in WARMUP_FAMILIES:
            given = f"steps={steps}" if steps is not None else (
                f"steps=None and hd.schedule({coef.family!r}, {coef.steps})")
            raise HyperdiffError(
                f"torch_optimizer: steps must be at least 2 with the {coef.family} schedule of "
                f"{coef_name} (got {given}): over one step the schedule is its step-0 value, "
                "0, which would be held for every step, so the model would never train; pass "
                "steps=T, the number of training steps")


def _declared_lengths(optimizer: Optimizer, hparams: HyperParameters) -> dict[str, int]:
    """Coefficient -> the number of steps its schedule declares: the length of a ``per_step``
    hyperparameter, or ``steps`` of a :class:`~hyperdiff.hparams.schedules.Schedule`."""
    lengths = {}
    for coef_name, coef in optimizer.coefficients.items():
        if isinstance(coef, Schedule):
            lengths[coef_name] = coef.steps
        elif isinstance(coef, str) and coef in hparams and hparams[coef].kind == "per_step":
            lengths[coef_name] = hparams[coef].shape[0]
    return lengths


def _horizon(optimizer: Optimizer, hparams: HyperParameters, steps: int | None) -> int:
    """The number of steps the exported schedule covers: ``steps``, or else the one length
    the schedules declare (1 when every coefficient is constant). A callable coefficient that
    declares no length (a plain function of the step) needs ``steps``: held at its step-0
    value it would lose every later one."""
    if steps is not None:
        return positive_int("torch_optimizer", "steps", steps)
    undeclared = [name for name, coef in optimizer.coefficients.items()
                  if callable(coef) and not isinstance(coef, Schedule)]
    if undeclared:
        raise HyperdiffError(
            f"torch_optimizer: steps must be the number of training steps T when coefficient "
            f"{undeclared[0]} is a function of the step (got steps=None); pass steps=T to "
            "evaluate it at steps 0 .. T-1"
        )
    lengths = _declared_lengths(optimizer, hparams)
    if len(set(lengths.values())) > 1:
        raise HyperdiffError(
            f"torch_optimizer: steps must be given when the schedules' lengths differ (got "
            f"steps=None, lengths {lengths}); pass steps=T, and each is stretched to T steps"
        )
    return next(iter(lengths.values()), 1)


def _coefficient_tables(optimizer: Optimizer, hparams: HyperParameters, names: list[str],
                        steps: int) -> dict[str, Table]:
    """``{param: {coefficient: values at steps 0..steps-1}}``; per_step hyperparameters are
    resampled to ``steps``, schedules stretched to ``steps`` (:meth:`Schedule.with_steps`),
    other callables evaluated at every step, the rest held constant (one value, which
    :func:`_group_values` holds for every step)."""
    view = hparams.view(hparams.raw)
    tables: dict[str, Table] = {name: {} for name in names}
    for coef_name, coef in optimizer.coefficients.items():
        if isinstance(coef, str):
            if coef not in hparams:
                raise HyperdiffError(f"torch_optimizer: coefficient {coef_name}={coef!r} must "
                                     f"name a hyperparameter, one of {list(hparams)}")
            spec = hparams[coef]
            if spec.kind in ("per_element", "per_feature"):
                raise HyperdiffError(
                    f"torch_optimizer: coefficient {coef_name}={coef!r} is {spec.kind}, which "
                    "torch.optim param groups cannot express (one value per group of tensors); "
                    "use scalar, per_tensor or per_step hyperparameters"
                )
            if spec.kind == "per_step":
                values = resample(view[coef].detach(), steps).tolist()
                for name in names:
                    tables[name][coef_name] = _checked(optimizer, coef_name, coef, name,
                                                       tuple(values))
                continue
        if isinstance(coef, Schedule) and (missing := sorted(set(coef.names.values())
                                                              - set(hparams))):
            raise HyperdiffError(
                f"torch_optimizer: the {coef.family} schedule of {coef_name} must read "
                f"hyperparameters of the collection (got {missing} missing; defined: "
                f"{list(hparams)})")
        if isinstance(coef, Schedule) and coef.steps != steps:
            coef = coef.with_steps(steps)  # the same curve in normalised time over T steps
        varying = range(steps) if callable(coef) else range(1)
        for name in names:
            tables[name][coef_name] = _checked(optimizer, coef_name, coef, name, tuple(
                _number(coef_name, resolve(coef, view, step, name), step, name)
                for step in varying))
    return tables


def _number(coef_name: str, value: Any, step: int, name: str) -> float:
    """A coefficient's value at ``step`` for tensor ``name`` as the one number a param group
    holds (a callable may return anything: a tensor shaped like the parameter, None)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if is_number(value):
        return float(value)
    raise HyperdiffError(
        f"torch_optimizer: coefficient {coef_name} must give one real number per step and "
        f"tensor, as a torch.optim param group holds one (got {describe(value)} at step {step} "
        f"for tensor {name!r}); a per_element or per_feature value cannot be a param group")


def _checked(optimizer: Optimizer, coef_name: str, coef: Any, name: str,
             values: tuple[float, ...]) -> tuple[float, ...]:
    """``values`` of a coefficient at steps 0, 1, ... for tensor ``name``, refused where one
    is not valid for the optimizer (``optimizer.valid``, as ``make_problem`` checks them):
    torch.optim validates only the values it is constructed with, so a negative learning
    rate at a later step would ascend and a beta2 above 1 give NaN without a word."""
    valid = optimizer.valid.get(coef_name)
    if valid is None:
        return values
    bad = [t for t, v in enumerate(values) if not valid.contains(v)]
    if bad:
        label, remedy = (
            (f"{coef_name}={coef!r}", f"constrain hyperparameter {coef!r} to them (a "
             "positive or a (low, high) constraint)") if isinstance(coef, str) else
            (coef_name, "give the schedule's parameters values that keep it inside them")
            if isinstance(coef, Schedule) else
            (coef_name, "make the function return values inside them"))
        more = f", and {len(bad) - 1} more steps" if len(bad) > 1 else ""
        raise HyperdiffError(
            f"torch_optimizer: coefficient {label} of {optimizer.name} must be {valid.text()} "
            f"at every step (got {values[bad[0]]!r} at step {bad[0]} for tensor {name!r}"
            f"{more}), as hyperdiff's training requires; {remedy}")
    return values


def _group_values(optimizer_name: str, table: Table, step: int) -> dict[str, Any]:
    """torch.optim param-group entries of one group at ``step`` (the last step held after)."""
    values = {c: v[min(step, len(v) - 1)] for c, v in table.items()}
    group: dict[str, Any] = {}
    for coef, key in GROUP_KEYS[optimizer_name].items():
        if key == "betas":
            group["betas"] = (values["beta1"], values["beta2"])
        else:
            group[key] = values[coef]
    return group


class TunedSchedule(LRScheduler):
    """Sets every tuned coefficient of every param group before each optimizer step.

    ``group[key] = value[step]`` for ``step = scheduler.last_epoch``; past the end of the
    schedule the last values are held. Call ``scheduler.step()`` after ``optimizer.step()``,
    as with any ``torch.optim.lr_scheduler``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optimizer_name: str,
                 tables: list[Table]):
        self.optimizer_name, self.tables = optimizer_name, tables
        super().__init__(optimizer)

    def _values(self) -> list[dict[str, Any]]:
        step = max(self.last_epoch, 0)
        return [_group_values(self.optimizer_name, t, step) for t in self.tables]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [float(v["lr"]) for v in self._values()]

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        if epoch is None:
            super().step()
        else:
            super().step(epoch)
        for group, values in zip(self.optimizer.param_groups, self._values(), strict=True):
            group.update({k: v for k, v in values.items() if k != "lr"})


def torch_optimizer(
    optimizer: Optimizer, hparams: HyperParameters | OptimizeResult,
    module_or_params: nn.Module | Mapping[str, Tensor], *, steps: int | None = None,
) -> tuple[torch.optim.Optimizer, TunedSchedule]:
    """A ``torch.optim`` optimizer and scheduler that train as ``optimizer`` at ``hparams``.

    Args:
        optimizer: the inner optimizer that was tuned (``hd.sgd``, ``hd.adam``, ``hd.adamw``).
        hparams: tuned hyperparameters (``result.best_hparams``) or an ``OptimizeResult``.
        module_or_params: the module (``named_parameters()`` names must be those the
            hyperparameters were defined over) or a dict name -> leaf parameter; only those
            that require grad are exported (frozen ones stay fixed, as in hyperdiff).
        steps: length T of the exported schedule; a ``per_step`` schedule of another length is
            stretched by :func:`resample`, a :class:`Schedule` by ``with_steps(T)``, another
            callable coefficient is evaluated at steps ``0 .. T-1`` (default: the length the
            schedules declare; required with a callable that declares none).

    Returns:
        ``(torch_opt, scheduler)``: ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` with one param
        group per set of tensors sharing their coefficient values, and a :class:`TunedSchedule`.

    Raises:
        HyperdiffError: a callable coefficient that declares no length (or schedules of
            different lengths) without ``steps``; ``per_element`` / ``per_feature``
            coefficients, or a callable giving anything but one number per step and tensor;
            a value the optimizer refuses at some step (``optimizer.valid``); an SGD momentum
            that is 0 at some steps only, or at all with dampening or Nesterov; no parameter
            that requires grad, or one tensor under two names; trainable parameters other
            than those a ``per_tensor`` coefficient was defined over; a warmup schedule over
            one step (its one value, 0, would be held).
    """
    if not isinstance(optimizer, Optimizer):
        raise HyperdiffError("torch_optimizer: optimizer must be made by hd.sgd, hd.adam or "
                             f"hd.adamw (got {describe(optimizer)})")
    tuned = _as_hparams(hparams, "torch_optimizer")
    named = _named_parameters(module_or_params, "torch_optimizer")
    _check_parameter_names(optimizer, tuned, named)
    _refuse_low_precision(named)
    horizon = _horizon(optimizer, tuned, steps)
    _refuse_one_step_warmup(optimizer, horizon, steps)
    tables = _coefficient_tables(optimizer, tuned, list(named), horizon)
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, table in tables.items():
        groups.setdefault(tuple(sorted(table.items())), []).append(name)
    group_tables = [tables[members[0]] for members in groups.values()]
    param_groups = [
        {"params": [named[n] for n in members], **_group_values(optimizer.name, table, 0)}
        for members, table in zip(groups.values(), group_tables, strict=True)
    ]
    torch_opt: torch.optim.Optimizer
    if optimizer.name == "sgd":
        _check_momentum_zeros(optimizer, group_tables, list(groups.values()))
        settings = optimizer.settings
        torch_opt = torch.optim.SGD(param_groups, lr=param_groups[0]["lr"],
                                    momentum=param_groups[0]["momentum"],
                                    nesterov=bool(settings.get("nesterov", False)),
                                    dampening=float(settings.get("dampening", 0.0)))
    elif optimizer.name == "adam":
        torch_opt = torch.optim.Adam(param_groups)
    else:
        torch_opt = torch.optim.AdamW(param_groups)
    return torch_opt, TunedSchedule(torch_opt, optimizer.name, group_tables)


def _refuse_low_precision(named: Mapping[str, Tensor]) -> None:
    """Refuse float16 / bfloat16 parameters: hyperdiff updates them in float32 with float32
    state (docs/devices.md), torch.optim in their own dtype, so the exported training would
    be another one (float16 Adam's eps 1e-8 rounds to 0 and its steps overflow)."""
    low = [n for n, t in named.items() if t.dtype in (torch.float16, torch.bfloat16)]
    if low:
        dtype = str(named[low[0]].dtype).removeprefix("torch.")
        raise HyperdiffError(
            f"torch_optimizer: parameters must be float32 or float64 to train as hyperdiff "
            f"did (got {low[:4]} in {dtype}, which hyperdiff updates in float32 with float32 "
            "state while torch.optim would keep them in " + dtype + "); export with the "
            "module in float32 (module.float()), as a master copy of the weights")


def _check_momentum_zeros(optimizer: Optimizer, tables: list[Table],
                          members: list[list[str]]) -> None:
    """Refuse a momentum (a hyperparameter or a callable) that is 0 at some steps and not at
    others, or 0 at every step with ``dampening`` or ``nesterov``: ``torch.optim.SGD`` skips
    its momentum buffer at a step whose momentum is 0 (it neither starts nor updates it, and
    refuses Nesterov without momentum), where hyperdiff's SGD, like an unrolled heavy-ball,
    keeps it (scaling every step after the first by ``1 - dampening``), so the two would train
    apart. A constant momentum 0 has no buffer in hyperdiff either."""
    if isinstance(optimizer.coefficients.get("momentum"), (int, float)):
        return
    dampening = float(optimizer.settings.get("dampening", 0.0))
    nesterov = bool(optimizer.settings.get("nesterov", False))
    for table, tensors in zip(tables, members, strict=True):
        values = table.get("momentum", ())
        zero = [t for t, value in enumerate(values) if value == 0]
        if zero and len(zero) < len(values):
            raise HyperdiffError(
                f"torch_optimizer: the SGD momentum must be nonzero at every step or zero at all "
                f"(got 0 at steps {zero[:5]}{' ...' if len(zero) > 5 else ''} of {len(values)}): "
                "torch.optim.SGD skips its momentum buffer where the momentum is 0, so it would "
                "train apart from hyperdiff; start the schedule above 0")
        if zero and (dampening != 0 or nesterov):
            option = f"dampening={dampening}" if dampening != 0 else "nesterov=True"
            why = ("hyperdiff keeps the momentum buffer and scales every step after the first "
                   "by 1 - dampening, where torch.optim.SGD skips momentum where it is 0"
                   if dampening != 0 else "torch.optim.SGD refuses Nesterov momentum without "
                   "momentum")
            raise HyperdiffError(
                f"torch_optimizer: the SGD momentum must be nonzero for every tensor with "
                f"{option} (got 0 at every step for tensors {tensors[:4]}): {why}; keep the "
                "momentum above 0 (a (low, high) constraint with low > 0)")


def load_into(module: nn.Module,
              params: Mapping[str, Tensor] | HyperParameters | OptimizeResult,
              buffers: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Copy trained ``params`` (and ``buffers``: BatchNorm running statistics) into ``module``.

    Names are those of ``module.named_parameters()`` / ``named_buffers()`` (as in
    ``hd.functional(module).params``); every parameter that requires grad must be given, frozen
    ones (``requires_grad=False``, not in ``hd.functional(module).params``) may be. ``params``
    may also be tuned hyperparameters (``result.best_hparams``, ``hd.tuned_hparams(...)``) or
    an ``OptimizeResult`` holding an ``hd.initialization``: its learned theta_0 is loaded.
    Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise HyperdiffError(f"load_into: module must be a torch.nn.Module (got "
                             f"{describe(module)})")
    if isinstance(params, (HyperParameters, OptimizeResult)):
        hparams = _as_hparams(params, "load_into")
        if initialization_name(hparams) is None:
            raise HyperdiffError(
                "load_into: params must be a dict name -> tensor, or tuned hyperparameters "
                f"that hold an initialization (hd.initialization) (got {hparams!r})")
        params = initial_values(hparams)
    for what, values in (("params", params), ("buffers", buffers or {})):
        if not isinstance(values, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Tensor) for k, v in values.items()):
            raise HyperdiffError(f"load_into: {what} must be a dict name -> tensor (got "
                                 f"{describe(values)})")
    own_params = dict(module.named_parameters())
    own_buffers = dict(module.named_buffers())
    given = {**dict(params), **dict(buffers or {})}
    unknown = sorted(set(given) - set(own_params) - set(own_buffers))
    trainable = sorted(n for n, p in own_params.items() if p.requires_grad)
    missing = sorted(set(trainable) - set(params))
    if unknown or missing:
        raise HyperdiffError(
            f"load_into: params must name the module's trainable parameters {trainable} "
            f"(unknown: {unknown}, missing: {missing})"
        )
    targets = {name: own_params[name] if name in own_params else own_buffers[name]
               for name in given}
    for name, value in given.items():  # every shape first: an error leaves the module as it was
        if tuple(targets[name].shape) != tuple(value.shape):
            raise HyperdiffError(f"load_into: {name!r} must have shape "
                                 f"{tuple(targets[name].shape)} (got {tuple(value.shape)})")
    with torch.no_grad():
        for name, value in given.items():
            targets[name].copy_(value.detach())
    return module


def _target(target: Any) -> tuple[HyperParameters, str | None]:
    """The hyperparameters to fill in and the task name a run must record (None: unchecked)."""
    if isinstance(target, HyperParameters):
        return target, None
    if isinstance(target, Task):
        return target.hparams, target.name
    if isinstance(target, TaskSpec):
        if not isinstance(target.hparams, HyperParameters):
            raise HyperdiffError(
                f"tuned_hparams: task must be built when its hparams are a function of the data "
                f"(got the TaskSpec {target.name!r}); pass spec.build(...)"
            )
        return target.hparams, target.name
    raise HyperdiffError("tuned_hparams: task must be a hd.Task, a TaskSpec (hd.task(...)) or "
                         f"its hd.HyperParameters (got {describe(target)})")


def _read_result(source: str | Path) -> tuple[Any, Path]:
    """The parsed ``result.json`` of a run directory (``comparison.json`` of a ``hyperdiff
    compare`` directory, which holds no result.json), or of the file ``source``."""
    path = Path(source)
    if path.is_dir():
        path = path / ("comparison.json" if not (path / "result.json").exists()
                       and (path / "comparison.json").exists() else "result.json")
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except FileNotFoundError:
        raise HyperdiffError(f"tuned_hparams: {path} does not exist; a finished run "
                             "directory holds result.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HyperdiffError(f"tuned_hparams: {path} is not a readable result "
                             f"file ({err})") from None


def _compared_values(source: Mapping[str, Any], method: str | None, where: str) -> Any:
    """The best natural values of ``method`` in a comparison (``hyperdiff compare``'s
    ``comparison.json``): ``source["methods"][i]["best"]["values"]``."""
    rows = {row.get("method"): row for row in source["methods"]
            if isinstance(row, Mapping) and isinstance(row.get("method"), str)}
    if method not in rows:
        close = difflib.get_close_matches(str(method), [str(m) for m in rows], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise HyperdiffError(f"tuned_hparams: method must be one of the methods that {where} "
                             f"compared, {sorted(map(str, rows))} (got {method!r}){hint}")
    if rows[method].get("no_finite_trial"):
        raise HyperdiffError(f"tuned_hparams: method {method!r} of {where} must have a winner "
                             "with a finite loss (got a method every trial of which diverged); "
                             "export another method, or compare again with a narrower "
                             "search space")
    best = rows[method].get("best")
    if not isinstance(best, Mapping) or not isinstance(best.get("values"), Mapping):
        raise HyperdiffError(f"tuned_hparams: {where} must hold method {method!r}'s best "
                             "values (got a comparison without them, written by an older "
                             "hyperdiff compare); run hyperdiff compare again")
    return best["values"]


def _check_task(task: Any, task_name: str | None, source: Mapping[str, Any], where: str,
                run_dir: Path | None = None, *, compared: bool = False) -> None:
    """Refuse a source of another task than ``task`` (named ``task_name``), or one made with
    other task params or another ``task.data_seed`` (its ``config.toml`` in ``run_dir``; a
    comparison's, ``compared``, its ``"data_seed"``) than a task built by ``build_task``
    (``task.info["params"]``, ``["data_seed"]``)."""
    recorded = source.get("task")
    if task_name is not None and recorded != task_name:
        raise HyperdiffError(
            f"tuned_hparams: source must be a run of task {task_name!r} (got {where}, a run "
            f"of task {recorded!r}); pass that run's directory, or the task it tuned"
        )
    if isinstance(task, Task) and "params" in task.info:
        ours, theirs = dict(task.info["params"]), _recorded_params(source, run_dir)
        defaults = ({} if theirs is None or ours == theirs
                    else factory_defaults(_task_reference(task.name, run_dir)))
        if theirs is not None and {**defaults, **ours} != {**defaults, **theirs}:
            raise HyperdiffError(
                f"tuned_hparams: source must be a run of task {task_name!r} with the task's "
                f"params {ours} (got {where}, a run with the params {theirs}); build the task "
                "with the run's params (--set task.params.NAME=VALUE, build_task(params=...))")
    _check_data_seed(task, run_dir, where, source if compared else None)


def _recorded_params(source: Mapping[str, Any], run_dir: Path | None) -> dict[str, Any] | None:
    """The task params of a run: ``result.json``'s ``task_params`` (left out when empty). A
    diverged run's result records none: its ``config.toml``'s ``[task] params``, and ``None``
    (not checked) for a diverged result given as a dict."""
    if source.get("status") != "diverged" or "task_params" in source:
        return dict(source.get("task_params") or {})
    if run_dir is None:
        return None
    section = _recorded_config(run_dir).get("task")
    params = section.get("params") if isinstance(section, dict) else None
    return dict(params) if isinstance(params, dict) else {}


def _task_reference(task_name: str, run_dir: Path | None) -> str:
    """What names the run's task factory: its ``config.toml``'s ``task.name`` (``file.py:build``
    for a user task, whose ``hd.task`` name the result records), else ``task_name``."""
    section = _recorded_config(run_dir).get("task") if run_dir is not None else None
    name = section.get("name") if isinstance(section, dict) else None
    return name if isinstance(name, str) else task_name


def _check_data_seed(task: Any, run_dir: Path | None, where: str,
                     source: Mapping[str, Any] | None = None) -> None:
    """Refuse a run whose ``config.toml`` records another ``task.data_seed`` than the task's
    (``task.info["data_seed"]``), or a comparison (``source``, ``hyperdiff compare``'s
    ``comparison.json``, given with ``run_dir=None``) whose ``"data_seed"`` differs: its tuned
    per-example weights index other examples, its winners were picked on other splits. Not
    checked where one is not recorded (a result given as a dict, a comparison written before
    compare recorded ``"data_seed"``, which cannot be judged, a task built without it, a
    config without the key); a run directory without a readable ``config.toml`` (every run
    writes it when it starts) is refused."""
    ours = task.info.get("data_seed") if isinstance(task, Task) else None
    if ours is None:
        return
    theirs = (_recorded_data_seed(run_dir) if run_dir is not None else
              _seed_or_none(source.get("data_seed")) if source is not None else None)
    if theirs is not None and theirs != ours:
        what = "a run" if run_dir is not None or source is None else "a comparison"
        raise HyperdiffError(
            f"tuned_hparams: source must be {what} with the task's data_seed {ours} (got "
            f"{where}, {what} with task.data_seed = {theirs}, whose tuned values were fitted to "
            "other splits: a per-example weight would land on another example); build the "
            f"task with data_seed={theirs} (build_task(..., data_seed={theirs}), --set "
            f"task.data_seed={theirs})")


def _recorded_config(run_dir: Path) -> dict[str, Any]:
    """The run's parsed ``config.toml``; a missing or damaged one is refused: every run writes
    it when it starts, so without it the run's task settings are unknown."""
    path = run_dir / "config.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problem = "it does not exist"
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        problem = f"it cannot be read: {err}"
    raise HyperdiffError(
        f"tuned_hparams: {path} must be the run's config.toml, which records the task "
        f"settings (task.data_seed, task.params) its values were tuned with ({problem}); "
        "every run writes it when it starts: restore it, or read the result from the run "
        "directory it came from")


def _seed_or_none(seed: Any) -> int | None:
    """``seed`` if it is an int (not a bool), else ``None``."""
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _recorded_data_seed(run_dir: Path) -> int | None:
    """``task.data_seed`` of the run's ``config.toml`` (``None``: no such key); a missing or
    unreadable file is refused (:func:`_recorded_config`)."""
    section = _recorded_config(run_dir).get("task")
    return _seed_or_none(section.get("data_seed") if isinstance(section, dict) else None)


def tuned_hparams(task: Task | TaskSpec | HyperParameters, source: Any, *,
                  method: str | None = None) -> HyperParameters:
    """The task's hyperparameters with the tuned natural values of ``source``: an
    ``OptimizeResult``, the dict that ``hyperdiff run`` writes to ``result.json``, that file,
    or its run directory; or, with ``method`` (``"hyperdiff"``, ``"random"``, ``"tpe"``), the
    best values that method found in a ``hyperdiff compare`` comparison (its
    ``comparison.json``, that file's directory, or the loaded dict).

    Given a task (a built ``hd.Task`` or the ``hd.task(...)`` spec), a result that records
    another task (its ``"task"`` entry) is refused, also when the hyperparameter names happen
    to match, and so is one made with other task params than a task that ``build_task`` built
    (``"task_params"``, the factory's defaults filled in on both sides), or, read from a run
    directory, with another ``task.data_seed`` (its ``config.toml``, which must be readable;
    a comparison's ``"data_seed"`` entry, not checked in one written before compare recorded
    it); given only ``hd.HyperParameters``, the names and shapes are checked. A run whose
    divergence guard gave up gives its best step's ``best_values``.
    """
    hparams, task_name = _target(task)
    if isinstance(source, (OptimizeResult, OnlineResult)):
        best = _as_hparams(source, "tuned_hparams")
        return _with_values(hparams, dict(best.natural()), "the result")
    where, run_dir = "the result", None
    if isinstance(source, (str, Path)):
        source, path = _read_result(source)
        where, run_dir = str(path), path.parent
    compared = isinstance(source, Mapping) and isinstance(source.get("methods"), list)
    if compared:
        values = _compared_values(source, method, where)
    elif method is not None:
        raise HyperdiffError(f"tuned_hparams: method must be given only with a comparison "
                             f"(hyperdiff compare's comparison.json) (got method={method!r} "
                             f"and {where}, a run's result)")
    else:
        values = _run_values(source, where)
    if not isinstance(values, Mapping):
        raise HyperdiffError("tuned_hparams: source must be an OptimizeResult, a run directory "
                             "or a result with a 'tuned' -> 'hparams' entry, or a comparison "
                             f"with method=... (got {describe(source)})")
    _check_task(task, task_name, source, where, None if compared else run_dir,
                compared=compared)  # a comparison's directory holds no config.toml
    return _with_values(hparams, values, where)


def _run_values(source: Any, where: str) -> Any:
    """A run's tuned natural values: ``tuned`` -> ``hparams`` of a finished run, the best
    step's ``best_values`` of one whose divergence guard gave up (as ``--from`` starts from
    them); a run that diverged before any good step has none."""
    if not isinstance(source, Mapping):
        return None
    if source.get("status") == "diverged":
        values = source.get("best_values")
        if not isinstance(values, Mapping):
            raise HyperdiffError(
                f"tuned_hparams: source must be a finished run, or one that diverged after a "
                f"good step (got {where}, a run that diverged before any good step: "
                f"{source.get('message')}); it holds no tuned values: start a new run with a "
                "smaller outer.lr")
        return values
    tuned = source.get("tuned")
    return tuned.get("hparams") if isinstance(tuned, Mapping) else None


def _with_values(hparams: HyperParameters, values: Mapping[str, Any], where: str
                 ) -> HyperParameters:
    """``hparams`` at the natural ``values`` (one per name, each of the name's shape)."""
    missing = sorted(set(hparams) - set(values))
    if missing:
        raise HyperdiffError(f"tuned_hparams: the result has no values for {missing}; it "
                             f"holds {sorted(values)}")
    natural = {}
    for name, spec in hparams.items():
        try:  # held on the CPU in float64 (see hyperdiff.hparams.hyperparams)
            value = torch.as_tensor(values[name], dtype=torch.float64, device="cpu")
        except (TypeError, ValueError, RuntimeError):
            raise HyperdiffError(f"tuned_hparams: {where}'s tuned value of {name!r} must be a "
                                 f"number or a list of numbers (got "
                                 f"{describe(values[name])})") from None
        if tuple(value.shape) != spec.shape:
            raise HyperdiffError(f"tuned_hparams: {where}'s tuned value of {name!r} must have "
                                 f"the shape {spec.shape} of the task's {spec.kind} {name!r} "
                                 f"(got shape {tuple(value.shape)}: a result of another "
                                 "hyperparameter)")
        natural[name] = value
    return hparams.with_recorded(natural)


__all__ = ["TunedSchedule", "load_into", "torch_optimizer", "tuned_hparams"]
