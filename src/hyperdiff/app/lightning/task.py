"""Offline tuning of a ``LightningModule`` as it is: :func:`lightning_task` builds a task.

- training loss: ``module.training_step(batch, batch_idx)`` at the functional parameters and
  buffers (:mod:`hyperdiff.app.lightning.steps`);
- validation loss: ``validation_step(batch, 0)`` (a tensor, or a dict with ``"val_loss"`` or
  ``"loss"``), or ``val_loss(module, batch)``;
- inner optimizer: the one ``configure_optimizers`` returns, its coefficients named in
  ``hparams`` tuned (:mod:`hyperdiff.app.lightning.optim`);
- splits: the DataModule's ``train_dataloader()`` in a ``Trainer``'s order
  (:mod:`hyperdiff.app.lightning.loaders`), ``val_dataloader()`` (the selection split cut out
  of it) and ``test_dataloader()``.

The result is an ordinary ``hd.task(...)``: ``hd.HyperOptimizer`` on ``spec.build()``'s
problems, or ``hyperdiff run --task file.py:build`` for a factory returning it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from hyperdiff.app.lightning.loaders import TrainerOrder
from hyperdiff.app.lightning.optim import configured_optimizer, inner_optimizer
from hyperdiff.app.lightning.steps import LightningSteps
from hyperdiff.app.tasks.spec import TaskSpec, given_splits, task
from hyperdiff.engine.data import FromCallable
from hyperdiff.engine.models import StepContext
from hyperdiff.errors import HyperdiffError, describe
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.typing import Batch, Params

CALLER = "lightning_task"
BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
GRADIENT_HOOKS = ("backward", "on_after_backward", "on_before_optimizer_step",
                  "configure_gradient_clipping", "optimizer_step", "optimizer_zero_grad")
SET_HERE = {"name", "model", "train_loss", "val_loss", "hparams", "optimizer", "data", "steps",
            "metrics", "cross_validation"}


def overridden_hooks(obj: Any, names: tuple[str, ...]) -> list[str]:
    """The hooks among ``names`` that ``obj``'s class overrides, against ``LightningModule``
    or ``LightningDataModule`` (none for other objects, or without lightning)."""
    try:
        from lightning.pytorch import LightningDataModule, LightningModule
    except ModuleNotFoundError:
        return []
    for base in (LightningModule, LightningDataModule):
        if isinstance(obj, base):
            return [n for n in names if hasattr(base, n)
                    and getattr(type(obj), n, None) is not getattr(base, n)]
    return []


def refuse_hooks(obj: Any, owner: str, names: tuple[str, ...], caller: str, why: str) -> None:
    """Refuse ``obj`` (the ``module`` or ``datamodule``) if it overrides one of ``names``."""
    hooks = overridden_hooks(obj, names)
    if hooks:
        raise HyperdiffError(
            f"{caller}: {owner} must not override {hooks[0]} (got an override in "
            f"{type(obj).__qualname__}): {why}")


def one_loader(loader: Any, caller: str, split: str, advice: str) -> Any:
    """The loader of a ``*_dataloader()`` that returned one (or a one-element list, tuple or
    dict of one); several are refused."""
    if isinstance(loader, Mapping):
        loader = list(loader.values())
    if isinstance(loader, (list, tuple)):
        if len(loader) != 1:
            raise HyperdiffError(
                f"{caller}: datamodule.{split}_dataloader() must return one DataLoader (got "
                f"{len(loader)} DataLoaders); hyperdiff uses one {split} split: {advice}")
        loader = loader[0]
    return loader


def datamodule_loaders(datamodule: Any, caller: str, stages: tuple[str, ...] | None
                       ) -> dict[str, Any]:
    """``{"train": ..., "val": ..., "test": ...}`` loaders of a ``LightningDataModule`` after
    ``prepare_data()`` and ``setup(stage)`` for each of ``stages``, as a ``Trainer`` calls them
    (``None``: a Trainer has already set it up; train and val only); ``val_dataloader()``
    and ``test_dataloader()`` must give one loader each."""
    for hook in ("train_dataloader", "val_dataloader"):
        if not callable(getattr(datamodule, hook, None)):
            raise HyperdiffError(f"{caller}: datamodule must be a LightningDataModule with "
                                 f"{hook}() (got {describe(datamodule)})")
    if stages is not None:
        datamodule.prepare_data()
        for stage in stages:
            datamodule.setup(stage)
    loaders: dict[str, Any] = {}
    for split in ("train", "val", *(("test",) if stages and "test" in stages else ())):
        loaders[split] = read_loader(datamodule, split, caller)
    advice = ("return the validation loader alone, or pass val_data= batches"
              if caller != CALLER else "return the validation loader alone")
    loaders["val"] = one_loader(loaders["val"], caller, "val", advice)
    if "test" in loaders:
        loaders["test"] = one_loader(loaders["test"], caller, "test",
                                     "return the test loader alone")
    return loaders


def read_loader(datamodule: Any, split: str, caller: str) -> Any:
    """``datamodule.<split>_dataloader()``, its failure a ``HyperdiffError``."""
    try:
        return getattr(datamodule, f"{split}_dataloader")()
    except Exception as err:  # Lightning's own "must be implemented" included
        raise HyperdiffError(f"{caller}: datamodule.{split}_dataloader() must return a "
                             f"DataLoader (it raised {type(err).__name__}: {err})") from err


def metrics_of(steps: LightningSteps, metrics: Callable[[nn.Module, Batch], Mapping[str, Any]]
               ) -> Callable[..., dict[str, float]]:
    """``metrics(module, batch)`` as a task's ``metrics(params, hparams, batch, ctx)``."""

    def evaluate(params: Params, hparams: Any, batch: Batch, ctx: StepContext
                 ) -> dict[str, float]:
        out = steps.call(lambda m, b, _: metrics(m, b), params, batch, 0, ctx)
        if not isinstance(out, Mapping) or "loss" not in out:
            raise HyperdiffError(f"{CALLER}: metrics must return a dict with a 'loss' entry "
                                 f"(got {describe(out)})")
        return {k: float(v) for k, v in out.items()}

    return evaluate


def lightning_task(
    module: nn.Module, datamodule: Any, hparams: HyperParameters, *, steps: int,
    val_loss: Callable[[nn.Module, Batch], Tensor] | None = None,
    metrics: Callable[[nn.Module, Batch], Mapping[str, Any]] | None = None,
    schedules: Mapping[str, Schedule] | None = None, name: str | None = None, **options: Any,
) -> TaskSpec:
    """A tuning task (``hd.task``) that trains ``module`` as a ``Trainer`` would.

    Args:
        module: the ``LightningModule`` at its initial weights (theta_0, copied; never
            modified).
        datamodule: its ``LightningDataModule``; the train loader must replay (a map-style
            data set, sequential or shuffled from ``generator=``).
        hparams: what is tuned, named by the optimizer's coefficients: ``lr`` (a scalar,
            ``hd.per_step(steps, ...)`` or a schedule), ``weight_decay`` (a scalar or
            ``hd.per_tensor(dict(module.named_parameters()), ...)``), ``momentum``, ...
        steps: inner steps T, optimizer steps of the ``Trainer`` (``max_steps``).
        val_loss: ``val_loss(module, batch) -> scalar`` (default: ``validation_step``'s).
        metrics: ``metrics(module, batch) -> {"loss": ..., ...}`` for reports.
        schedules: coefficient -> ``hd.schedule(family, steps)``, whose parameters
            (``lr_peak``, ...) are then in ``hparams``: ``{"lr": hd.schedule(...)}``.
        name: the task's name (default: the module's class name).
        options: any other keyword of ``hd.task`` (``defaults``, ``description``, ...).

    Raises:
        HyperdiffError: an unsupported optimizer or an lr scheduler in
            ``configure_optimizers``, a train loader that cannot be replayed, a
            ``training_step`` / ``validation_step`` that returns no loss.
    """
    steps_of = LightningSteps(module, CALLER)
    if not isinstance(hparams, HyperParameters):
        raise HyperdiffError(f"{CALLER}: hparams must be a hd.HyperParameters naming the "
                             f"optimizer's coefficients (got {describe(hparams)})")
    valid = set(inspect.signature(task).parameters) - SET_HERE
    unknown = sorted(set(options) - valid)
    if unknown:
        raise HyperdiffError(f"{CALLER}: options must be keywords of hd.task, some of "
                             f"{sorted(valid)} (got {unknown[0]!r})")
    for owner, obj in (("module", module), ("datamodule", datamodule)):
        refuse_hooks(obj, owner, BATCH_HOOKS, CALLER,
                     "hyperdiff reads the DataModule's loaders without a Trainer, so the hook "
                     "would not run; apply the transform in the Dataset, the DataLoader's "
                     "collate_fn or training_step")
    refuse_hooks(module, "module", GRADIENT_HOOKS, CALLER,
                 "hyperdiff trains with the optimizer of configure_optimizers and no Trainer, "
                 "so a hook that changes gradients or the step would be skipped; remove it to "
                 "tune (clipping, accumulation and custom steps are not reproduced)")
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    optimizer = inner_optimizer(configured_optimizer(module, CALLER), hparams, named, CALLER,
                                schedules)
    loaders = datamodule_loaders(datamodule, CALLER, ("fit", "test"))
    order = TrainerOrder(loaders["train"], CALLER)
    train = FromCallable(order, f"train_dataloader() of {type(datamodule).__name__}")
    train_loss = steps_of.train_loss(order.per_epoch)
    return task(
        name or type(module).__name__, model=(steps_of.params, steps_of.buffers),
        train_loss=train_loss, val_loss=steps_of.val_loss(val_loss), hparams=hparams,
        optimizer=optimizer,
        data=given_splits(train=train, val=loaders["val"], test=loaders["test"]),
        steps=steps, metrics=None if metrics is None else metrics_of(steps_of, metrics),
        cross_validation="a LightningDataModule gives its splits", **options)
