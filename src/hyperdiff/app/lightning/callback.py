"""Online tuning inside a ``Trainer`` run: :class:`HyperdiffCallback`.

The ``Trainer`` trains; hyperdiff's one outer loop (``HyperOptimizer`` with the online plan,
:mod:`hyperdiff.tuner.online_plan`) tunes. At every optimizer step ``t`` of the run
(``trainer.global_step``) the callback

1. feeds the ``Trainer``'s batch to the problem's :class:`~hyperdiff.engine.data.Fed` source
   and writes the tuned values of step ``t`` (``lr[t]``, the weight decay of each tensor, ...)
   into the optimizer's param groups (one group per tensor), before the ``Trainer`` steps;
2. after the last step of a window ``[t0, t0 + K)``: ``loop.step()``, which replays the window
   from the plan's state over the fed batches with the online method, takes its hypergradient
   and makes the outer step; then it checks that the replayed parameters and buffers equal the
   ``Trainer``'s, to rounding (``sqrt(eps) * max(1, max |theta|)``), or raises.

So the run is hyperdiff's own online run (the same windows, values and outer steps) with its
inner training done by the ``Trainer`` as well; the cost is one plain training plus the
window hypergradients (``benchmarks/lightning_online.py`` measures it). What the replay cannot
follow is refused before the first step: gradient clipping or accumulation (also a
``GradientAccumulationScheduler``'s), mixed precision, manual optimization, an lr scheduler
(also one added during the fit, as ``StochasticWeightAveraging`` does, which is refused
itself), several optimizers, a resumed fit (``ckpt_path``). Validation batches go through the
Trainer's precision conversion and batch hooks, as its validation loop does. Randomness the
replay does not draw the same way (dropout) fails the state check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from hyperdiff.app.export import GROUP_KEYS
from hyperdiff.app.lightning.optim import (
    inner_optimizer,
    lightning_optimizers,
    refuse_training_changes,
)
from hyperdiff.app.lightning.steps import LightningSteps
from hyperdiff.app.lightning.task import GRADIENT_HOOKS, datamodule_loaders, overridden_hooks
from hyperdiff.engine.data import Fed, validation_batches
from hyperdiff.engine.make import make_problem
from hyperdiff.engine.optimizers import Optimizer, resolve
from hyperdiff.errors import HyperdiffError, describe, positive_int
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.tree import tree_map
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.online_plan import OnlinePlan, OnlineResult
from hyperdiff.typing import Batch

try:
    from lightning.pytorch.callbacks import Callback
except ModuleNotFoundError:  # an optional extra: the callback refuses to be made without it
    Callback = object  # type: ignore[misc,assignment]

CALLER = "HyperdiffCallback"


def _refuse_trainer_settings(trainer: Any, module: nn.Module) -> None:
    """The Trainer settings whose training the replay would not reproduce."""
    if trainer.ckpt_path is not None:
        raise HyperdiffError(f"{CALLER}: trainer.fit must start a fresh fit, without ckpt_path "
                             f"(got ckpt_path={str(trainer.ckpt_path)!r}, a resumed fit): the "
                             "window replay trains from the module's weights at step 0; tune a "
                             "fresh fit")
    why = "the window replay would not train as the Trainer does"
    refuse_training_changes(trainer, CALLER, why)
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    swa = [c for c in trainer.callbacks if isinstance(c, StochasticWeightAveraging)]
    checks = [
        (not module.automatic_optimization, "module.automatic_optimization", "True", False),
        (len(trainer.optimizers) != 1, "the number of optimizers", "1", len(trainer.optimizers)),
        (bool(trainer.lr_scheduler_configs), "the lr schedulers of configure_optimizers",
         "none (the callback sets the tuned values at every step)",
         len(trainer.lr_scheduler_configs)),
        (bool(swa), "trainer.callbacks", "free of StochasticWeightAveraging (its swa_lrs "
         "schedule and weight averaging would replace the tuned values)",
         type(swa[0]).__name__ if swa else None),
    ]
    for bad, what, valid, got in checks:
        if bad:
            raise HyperdiffError(f"{CALLER}: {what} must be {valid} (got {describe(got)}): "
                                 f"{why}")


def _as_validated(trainer: Any, module: nn.Module, batches: list[Batch]) -> list[Batch]:
    """The validation batches as the Trainer's validation loop hands them to
    ``validation_step``: its precision's ``convert_input`` (``64-true``: float64), then the
    module's and DataModule's ``on_before_batch_transfer``, ``transfer_batch_to_device`` and
    ``on_after_batch_transfer`` (with the Trainer in its validating stage)."""
    from lightning.pytorch.trainer.states import RunningStage

    before = trainer.state.stage
    trainer.state.stage = RunningStage.VALIDATING
    try:
        out = []
        for batch in batches:
            batch = trainer.precision_plugin.convert_input(batch)
            batch = module._on_before_batch_transfer(batch, dataloader_idx=0)  # type: ignore[operator]
            out.append(trainer.strategy.batch_to_device(batch, dataloader_idx=0))
        return out
    finally:
        trainer.state.stage = before


class HyperdiffCallback(Callback):
    """Tune the optimizer's coefficients online while ``trainer.fit`` trains.

    Args:
        hparams: what is tuned, named by the optimizer's coefficients (as for
            :func:`~hyperdiff.app.lightning.task.lightning_task`); a ``per_step`` schedule or
            a parametric schedule must cover the run's optimizer steps.
        window: K, optimizer steps per outer step.
        method: an online method (``hd.methods``, or its name), ``"reverse"`` by default.
        lr, optimizer, clip, schedule, seed: the outer loop's (``hd.HyperOptimizer``); the
            outer optimizer defaults to the online plan's (Adam).
        val_batch_size: validation rows per window (``None``: the whole split).
        val_loss: ``val_loss(module, batch)`` (default: ``validation_step``'s loss).
        val_data: validation batches, when ``trainer.fit`` gets no DataModule.
        schedules: coefficient -> ``hd.schedule(family, steps)`` over the run's optimizer
            steps, its parameters (``lr_peak``, ...) in ``hparams``. A parametric schedule is
            what online tuning can move: a ``per_step`` entry gets its hypergradient only after
            its step has been trained, so it never changes the run that tunes it.

    After ``fit``: :attr:`tuned` (the final values), :attr:`result` (the online run's
    ``OnlineResult``: history, values, replayed weights) and :meth:`configure_optimizers`.
    """

    def __init__(self, hparams: HyperParameters, *, window: int = 1, method: Any = "reverse",
                 lr: float = 0.05, optimizer: str | None = None, clip: float | None = None,
                 schedule: str = "cosine", seed: int = 0, val_batch_size: int | None = None,
                 val_loss: Callable[[nn.Module, Batch], Tensor] | None = None,
                 val_data: Any = None, schedules: Mapping[str, Schedule] | None = None):
        if Callback is object:
            raise HyperdiffError(f"{CALLER}: needs lightning (pip install "
                                 "'hyperdiff[lightning]')")
        if not isinstance(hparams, HyperParameters):
            raise HyperdiffError(f"{CALLER}: hparams must be a hd.HyperParameters naming the "
                                 f"optimizer's coefficients (got {describe(hparams)})")
        self.hparams, self.val_loss, self.val_data = hparams, val_loss, val_data
        self.schedules = schedules
        self.plan = OnlinePlan(window=window, val_batch_size=val_batch_size, hot_start="ignore")
        self.outer = {"method": method, "lr": lr, "optimizer": optimizer, "clip": clip,
                      "schedule": schedule, "seed": seed}
        self.loop: HyperOptimizer | None = None
        self.fed = Fed("the Trainer's batches")

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        """Check the Trainer, translate its optimizer, split its param groups per tensor."""
        if self.loop is not None:
            raise HyperdiffError(f"{CALLER}: a callback must tune one fit (got a second "
                                 "trainer.fit); make a new HyperdiffCallback for each")
        _refuse_trainer_settings(trainer, pl_module)
        self.steps_of = LightningSteps(pl_module, CALLER)
        self.named = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        opt = trainer.optimizers[0]
        self.optimizer: Optimizer = inner_optimizer(opt, self.hparams, self.named, CALLER,
                                                    self.schedules)
        if any(opt.state.get(p) for p in self.named.values()):
            raise HyperdiffError(f"{CALLER}: the optimizer must start without state (got a "
                                 "resumed one); tune a fresh fit")
        names = {id(p): n for n, p in self.named.items()}
        opt.param_groups[:] = [{**g, "params": [p]} for g in opt.param_groups
                               for p in g["params"]]
        self.groups = [(names[id(g["params"][0])], g) for g in opt.param_groups
                       if id(g["params"][0]) in names]  # frozen tensors: no gradient, no step
        if self.val_data is None:
            if trainer.datamodule is None:
                raise HyperdiffError(f"{CALLER}: val_data must be given when trainer.fit gets "
                                     "no datamodule (got None)")
            self.val_data = datamodule_loaders(trainer.datamodule, CALLER, None)["val"]
        self.val_batches = _as_validated(trainer, pl_module, validation_batches(self.val_data))
        self.hooks = overridden_hooks(pl_module, GRADIENT_HOOKS)
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise HyperdiffError(f"{CALLER}: the Trainer's optimizer steps must be finite "
                                 f"(got {total}); set max_steps or max_epochs")
        self.total = positive_int(CALLER, "the Trainer's optimizer steps", int(total))

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Batch,
                             batch_idx: int) -> None:
        """Feed the batch of step ``t``; set step ``t``'s values into the param groups."""
        step = int(trainer.global_step)
        if self.loop is None and step != 0:
            raise HyperdiffError(f"{CALLER}: the fit must start at step 0 (got "
                                 f"trainer.global_step = {step}, a resumed fit): the window "
                                 "replay trains from the module's weights at step 0; tune a "
                                 "fresh fit")
        if step >= self.total:
            return
        if trainer.accumulate_grad_batches != 1:
            raise HyperdiffError(f"{CALLER}: accumulate_grad_batches must be 1 (got "
                                 f"{trainer.accumulate_grad_batches} at step {step}, set during "
                                 "the fit): the window replay would not train as the Trainer "
                                 "does")
        if trainer.lr_scheduler_configs:  # one added during the fit (StochasticWeightAveraging)
            raise HyperdiffError(f"{CALLER}: the Trainer's lr schedulers must be none (got "
                                 f"{len(trainer.lr_scheduler_configs)} at step {step}, added "
                                 "during the fit): the callback sets the tuned values at every "
                                 "step")
        per_epoch = int(trainer.num_training_batches)
        if batch_idx != step % per_epoch:
            raise HyperdiffError(f"{CALLER}: the Trainer's batch_idx must be step mod "
                                 f"{per_epoch} (got {batch_idx} at step {step}): every batch "
                                 "is one optimizer step, a whole epoch each time")
        self.fed.feed(step, tree_map(lambda x: x.detach().clone() if isinstance(x, Tensor)
                                     else x, batch))
        if self.loop is None:
            self.loop = self._start(per_epoch)
        # the window's hypergradient call checked these values; one read per batch
        hview = self.loop.hparams.view(self.plan.problem.raw_tensors(self.loop.raw,
                                                                     check=False))
        for name, group in self.groups:
            values = {c: float(resolve(coef, hview, step, name))
                      for c, coef in self.optimizer.coefficients.items()
                      if not isinstance(coef, (int, float))}
            for coef_name, value in values.items():
                key = GROUP_KEYS[self.optimizer.name][coef_name]
                if key == "betas":
                    betas = list(group["betas"])
                    betas[coef_name == "beta2"] = value
                    group["betas"] = tuple(betas)
                else:
                    group[key] = value

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any,
                           batch: Batch, batch_idx: int) -> None:
        """After a window's last step: the outer step, and the state check."""
        done = int(trainer.global_step)
        if self.loop is None or self.plan.done or done != min(
                self.plan.inner_step + self.plan.window, self.total):
            return
        start = self.plan.inner_step
        record = self.loop.step()
        if record.status != "ok":
            raise HyperdiffError(f"{CALLER}: the window of steps {start}..{done - 1} must give "
                                 f"a finite hypergradient (got: {record.message}); a Trainer "
                                 "cannot go back to retrain it: lower the outer lr")
        self._check_state(pl_module, start, done)
        self.fed.forget(done)

    # ------------------------------------------------------------------ internals
    def _start(self, per_epoch: int) -> HyperOptimizer:
        """The online run over the Trainer's batches, from the module's weights now."""
        problem = make_problem(
            self.steps_of.train_loss(per_epoch), self.steps_of.val_loss(self.val_loss),
            self.hparams, (self.steps_of.params, self.steps_of.buffers),
            optimizer=self.optimizer, train_data=self.fed, val_data=self.val_batches,
            steps=self.total, probe=False, caller=CALLER)
        return HyperOptimizer(problem, plan=self.plan, **self.outer)

    def _check_state(self, module: nn.Module, start: int, stop: int) -> None:
        """The replayed parameters and buffers against the Trainer's, to rounding."""
        state = self.plan.state
        own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        for name, value in {**state.params, **state.buffers}.items():
            theirs = own[name].detach()
            scale = max(1.0, float(theirs.abs().max()))
            tol = float(torch.finfo(theirs.dtype).eps) ** 0.5 * scale
            diff = float((value.detach() - theirs).abs().max())
            if not diff <= tol:
                raise HyperdiffError(
                    f"{CALLER}: the replayed {name!r} must equal the Trainer's after steps "
                    f"{start}..{stop - 1}, to rounding {tol:.3g} (got a difference of "
                    f"{diff:.3g}); the Trainer trains differently from training_step and "
                    "configure_optimizers (dropout or other unseeded randomness, a hook that "
                    "changes gradients or weights"
                    + (f": the module overrides {', '.join(self.hooks)}" if self.hooks else "")
                    + ")")

    # ------------------------------------------------------------------ results
    @property
    def result(self) -> OnlineResult:
        """The online run's result (values, history, the replayed weights)."""
        if self.loop is None:
            raise HyperdiffError(f"{CALLER}: result must be read after trainer.fit (got a "
                                 "callback that has not trained)")
        return self.plan.result(self.loop)

    @property
    def tuned(self) -> HyperParameters:
        """The final tuned values (natural), as ``hd.HyperParameters``."""
        return self.result.final_hparams

    def configure_optimizers(self, module: nn.Module, *, steps: int | None = None
                             ) -> dict[str, Any]:
        """The tuned values as ``configure_optimizers`` output for ``module`` (see
        :func:`~hyperdiff.app.lightning.optim.lightning_optimizers`)."""
        tuned = self.tuned  # refuses a callback that has not trained
        return lightning_optimizers(self.optimizer, tuned, module, steps=steps)
