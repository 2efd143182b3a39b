"""``configure_optimizers`` both ways: the module's torch optimizer as a hyperdiff inner
optimizer, and tuned values back as ``configure_optimizers`` output.

``torch.optim.SGD`` / ``Adam`` / ``AdamW`` become ``hd.sgd`` / ``hd.adam`` / ``hd.adamw`` with
the same settings (which match torch.optim bit for bit); every coefficient named in the tuned
``hparams`` (``lr``, ``weight_decay``, ``momentum``, ``beta1``, ``beta2``, ``eps``) is read from
that hyperparameter, or from an ``hd.schedule`` given for it (whose few parameters are
hyperparameters: the way to tune a learning-rate schedule online), the others keep the
optimizer's numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from hyperdiff.app.export import GROUP_KEYS, torch_optimizer
from hyperdiff.engine.make import check_schedule_prefixes
from hyperdiff.engine.optimizers import Optimizer, adam, adamw, sgd
from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.tuner.history import OptimizeResult

SUPPORTED = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
REFUSED_FLAGS = ("maximize", "amsgrad", "fused", "differentiable", "capturable")


def configured_optimizer(module: nn.Module, caller: str) -> torch.optim.Optimizer:
    """The one optimizer that ``module.configure_optimizers()`` returns: the optimizer, a
    one-element list or tuple of it, ``([opt], [])``, or ``{"optimizer": opt}`` (with or
    without ``"monitor"``). A learning-rate scheduler is
    refused: the schedule is what hyperdiff tunes."""
    out = module.configure_optimizers()  # type: ignore[operator]
    if (isinstance(out, (list, tuple)) and len(out) == 2 and isinstance(out[0], (list, tuple))
            and isinstance(out[1], (list, tuple)) and not out[1]):
        out = out[0]  # ([opt], []): optimizers and no schedulers
    if isinstance(out, (list, tuple)) and len(out) == 1:
        out = out[0]
    if isinstance(out, Mapping) and set(out) in ({"optimizer"}, {"optimizer", "monitor"}):
        out = out["optimizer"]  # a monitor without a scheduler monitors nothing
    if not isinstance(out, torch.optim.Optimizer):
        raise HyperdiffError(
            f"{caller}: configure_optimizers must return one torch.optim optimizer without an "
            f"lr scheduler (the schedule is what hyperdiff tunes) (got {describe(out)})")
    return out


def _settings(opt: torch.optim.Optimizer, caller: str) -> dict[str, Any]:
    """The optimizer's one set of group settings; several groups must agree."""
    kinds = [k for k in SUPPORTED if type(opt) is k]
    if not kinds:
        raise HyperdiffError(f"{caller}: configure_optimizers must return torch.optim.SGD, Adam "
                             f"or AdamW (got {type(opt).__name__}), the optimizers hyperdiff "
                             "reproduces bit for bit")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    if any(g != groups[0] for g in groups[1:]):
        raise HyperdiffError(
            f"{caller}: configure_optimizers' param groups must share their settings (got "
            f"{len(groups)} groups that differ); tune per-tensor values with hd.per_tensor "
            "instead")
    settings = groups[0]
    for flag in REFUSED_FLAGS:
        if settings.get(flag):
            raise HyperdiffError(f"{caller}: the optimizer's {flag} must be False (got True); "
                                 "hyperdiff's inner optimizers have no such variant")
    return settings


def inner_optimizer(opt: torch.optim.Optimizer, hparams: HyperParameters,
                    params: Mapping[str, Tensor], caller: str,
                    schedules: Mapping[str, Schedule] | None = None) -> Optimizer:
    """The hyperdiff inner optimizer that trains as ``opt`` does, its coefficients named in
    ``hparams`` read from them and those in ``schedules`` (coefficient -> ``hd.schedule``, its
    parameters in ``hparams``) from the schedule. ``opt`` must train exactly ``params`` (the
    module's trainable parameters)."""
    schedules = dict(schedules or {})
    settings = _settings(opt, caller)
    kind = SUPPORTED[type(opt)]
    if kind == "adam" and settings.get("decoupled_weight_decay"):
        kind = "adamw"
    given = {id(p) for g in opt.param_groups for p in g["params"] if p.requires_grad}
    if given != {id(p) for p in params.values()}:  # frozen tensors get no gradient: skipped
        raise HyperdiffError(f"{caller}: configure_optimizers must optimize every trainable "
                             f"parameter of the module and no other (got {len(given)} "
                             f"trainable tensors for the module's {len(params)})")
    for coef_name, sched in schedules.items():
        if coef_name not in GROUP_KEYS[kind] or not isinstance(sched, Schedule):
            raise HyperdiffError(f"{caller}: schedules must map coefficients of "
                                 f"{type(opt).__name__} ({list(GROUP_KEYS[kind])}) to "
                                 f"hd.schedule(...) (got {coef_name!r}: {describe(sched)})")
    check_schedule_prefixes(caller, schedules)
    scheduled = {n for sched in schedules.values() for n in sched.names.values()}
    twice = [n for n in schedules if n in hparams and n not in scheduled]
    if twice:
        raise HyperdiffError(
            f"{caller}: hparams must not name a coefficient that schedules sets (got "
            f"{twice[0]!r} in both): the schedule sets {twice[0]}, so hyperparameter "
            f"{twice[0]!r} would be tuned without effect; drop it from hparams (the schedule's "
            f"parameters {sorted(schedules[twice[0]].names.values())} are what is tuned), or "
            "drop the schedule")
    unknown = [n for n in hparams if n not in GROUP_KEYS[kind] and n not in scheduled]
    if unknown:
        raise HyperdiffError(f"{caller}: hparams must name coefficients of {type(opt).__name__}, "
                             f"some of {list(GROUP_KEYS[kind])}, or the parameters of "
                             f"schedules (got {unknown[0]!r})")

    def coef(name: str, value: Any) -> Any:
        if name in schedules:
            return schedules[name]
        return name if name in hparams else float(value)

    if kind == "sgd":
        return sgd(coef("lr", settings["lr"]), coef("momentum", settings["momentum"]),
                   nesterov=bool(settings["nesterov"]), dampening=float(settings["dampening"]),
                   weight_decay=coef("weight_decay", settings["weight_decay"]))
    betas = (coef("beta1", settings["betas"][0]), coef("beta2", settings["betas"][1]))
    make = adamw if kind == "adamw" else adam
    return make(coef("lr", settings["lr"]), betas, coef("eps", settings["eps"]),
                weight_decay=coef("weight_decay", settings["weight_decay"]))


def refuse_training_changes(trainer: Any, caller: str,
                            why: str = "the Trainer would not train as hyperdiff does") -> None:
    """The ``Trainer`` settings that train otherwise than hyperdiff's optimizer: gradient
    clipping, gradient accumulation (also a ``GradientAccumulationScheduler``'s) and a
    precision other than ``32-true`` / ``64-true``."""
    scheduled = accumulation_schedule(trainer)
    checks = [
        (trainer.accumulate_grad_batches != 1, "accumulate_grad_batches", "1",
         trainer.accumulate_grad_batches),
        (scheduled is not None, "a GradientAccumulationScheduler's accumulate_grad_batches",
         "1 at every epoch", scheduled),
        (bool(trainer.gradient_clip_val), "gradient_clip_val", "None or 0",
         trainer.gradient_clip_val),
        (str(trainer.precision) not in ("32-true", "64-true"), "precision",
         "'32-true' or '64-true'", trainer.precision),
    ]
    for bad, what, valid, got in checks:
        if bad:
            raise HyperdiffError(f"{caller}: {what} must be {valid} (got {describe(got)}): "
                                 f"{why}")


def accumulation_schedule(trainer: Any) -> dict[int, int] | None:
    """The schedule ``{epoch: batches}`` of a ``GradientAccumulationScheduler`` among the
    Trainer's callbacks that accumulates at some epoch, or ``None``."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    for callback in trainer.callbacks:
        if isinstance(callback, GradientAccumulationScheduler) and any(
                n != 1 for n in callback.scheduling.values()):
            return dict(sorted(callback.scheduling.items()))
    return None


def lightning_optimizers(optimizer: Optimizer, hparams: HyperParameters | OptimizeResult,
                         module: nn.Module, *, steps: int | None = None) -> dict[str, Any]:
    """Tuned values as ``configure_optimizers`` output: ``{"optimizer": torch_opt,
    "lr_scheduler": {"scheduler": schedule, "interval": "step"}}``, the pair of
    :func:`hyperdiff.torch_optimizer` (param groups per set of tensors sharing their values,
    a scheduler that sets every scheduled coefficient before each step), stepped by the
    ``Trainer`` after every optimizer step. Called from ``configure_optimizers`` inside a
    fit, it refuses the ``Trainer`` settings that would train otherwise (gradient clipping,
    accumulation, mixed precision)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        refuse_training_changes(trainer, "lightning_optimizers")
    torch_opt, schedule = torch_optimizer(optimizer, hparams, module, steps=steps)
    return {"optimizer": torch_opt,
            "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}
