"""Online tuning: adapt hyperparameters every K steps of one training run, with no restart.

With raw hyperparameters ``u`` (natural ``lam = f(u)``) and one run of N inner steps::

    s = s_0 (theta_0, buffers, optimizer state); t = 0
    while t < N:
        train steps t .. t+K-1 at lam, taking the window hypergradient g = dL_val/du at the
        validation batch B_h of hyper-step h: method.segment(..., t, t+K, ...) (methods/base.py)
        u <- torch.optim step on g (Adam by default; normalize=True: on g / ||g||_2)
        t <- t + K; h <- h + 1

Training continues from the current parameters and optimizer state: the whole run costs one
N-step training plus the window hypergradients. ``B_h`` is ``val_batch_size`` rows of the
validation split drawn from ``(seed, h)`` (all of it when ``None``), so the run is a function
of its inputs, and :meth:`OnlineTuner.state_dict` holds everything that a resumed run needs to
continue bit for bit (parameters, buffers, optimizer state, raw values, the outer optimizer's
state, forward-mode tangents and the step counters that fix the data position).

**Divergence guard** (:class:`~hyperdiff.tuner.guard.DivergenceGuard`, as offline): a window fails
when its values are outside their constraint (nothing is trained), its training or hypergradient is
not finite, or its validation (or selection) loss is absurd (``> max_loss_ratio x
max(|L_0|, 1)``; at the first window, far above the untrained model's:
:mod:`hyperdiff.tuner.guard`). The tuner then discards the window: the parameters, buffers,
optimizer state, tangents and data position go back to the start of the failed window (the end of
the last good one), the raw values and the outer optimizer's state to those of the last good window,
the outer learning rate is multiplied by ``shrink``, and the same window is trained again (with the
next validation draw). ``max_failures`` failures in a row stop the run with a
:class:`~hyperdiff.errors.NonFiniteError` that says what happened.

**Hot start** (:mod:`~hyperdiff.tuner.hot_start`): at the window that reaches 10% of the run,
a run that trained more than twice the optimization time that its values by then give those
steps started hotter than what it found; with ``method="curvature"`` it then starts over by
default, once, from theta_0 at step 0 with those values, the learning rate divided by that
ratio (``hot_start``).

Hyperparameters must be defined for the whole run: a parametric schedule over N steps
(:mod:`hyperdiff.hparams.schedules`), scalars, per-tensor values. A ``per_step`` schedule is
accepted but its entry t receives a hypergradient only after step t has been trained.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.solvers import Solver
from hyperdiff.engine.training import TrainState, flat, initial_state, validation_loss
from hyperdiff.errors import (
    HyperdiffError,
    NonFiniteError,
    fail,
    is_number,
    nonnegative_int,
    positive_float,
    positive_int,
)
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.methods.base import Segment
from hyperdiff.methods.registry import OPTIMIZERS, SCHEDULES
from hyperdiff.methods.window_methods import online_methods, window_method
from hyperdiff.seeds import window_seed
from hyperdiff.tree import tree_flatten, tree_unflatten
from hyperdiff.tuner.guard import DivergenceGuard, untrained_loss
from hyperdiff.tuner.history import History, StepRecord, finite_or_none, natural_values, to_number
from hyperdiff.tuner.hot_start import MODES as HOT_START_MODES
from hyperdiff.tuner.hot_start import hot_start_warnings, measure_hot_start, restart_cooler
from hyperdiff.tuner.online_checkpoint import restore_tuner, tuner_state
from hyperdiff.typing import Batch, Params

Callback = Callable[["OnlineTuner", StepRecord], None]

METHODS = tuple(online_methods())
"""The method names the tuner takes (registered methods whose capabilities say online)."""
_LOG = logging.getLogger("hyperdiff.online")


@dataclass(frozen=True)
class OnlineResult:
    """The outcome of :meth:`OnlineTuner.run`.

    Attributes:
        final_raw: raw hyperparameters after the last update; ``final_hparams`` holds them.
        params, buffers: the model at the end of the run (trained while tuning).
        history: one :class:`StepRecord` per hyper-step (natural values used in its window).
        steps: inner steps trained; ``hyper_steps`` windows; ``time_s`` wall time.
        warnings: what the run found suspect (:mod:`hyperdiff.tuner.hot_start`).
    """

    final_raw: dict[str, Tensor]
    final_hparams: HyperParameters
    params: Params
    buffers: Params
    history: History
    steps: int
    hyper_steps: int
    time_s: float
    warnings: tuple[str, ...] = ()


class OnlineTuner:
    """Tune hyperparameters during one training run of ``problem.steps`` inner steps.

    Args:
        problem: the inner problem; ``problem.steps`` is the full run N.
        window: K, inner steps per hyper-step (K=1 with ``method="reverse"``: HD).
        method: ``"reverse"`` (backprop over the window), ``"forward"`` (RTHO, tangents carried
            across windows), ``"implicit"`` (IFT at the current parameters) or
            ``"curvature"`` (the learning rate's tangents carried under a diagonal curvature
            model, :mod:`hyperdiff.methods.curvature`; heavy-ball SGD, Adam and AdamW).
        optimizer, lr, clip: the outer ``torch.optim`` optimizer of the raw values, its learning
            rate, and an optional L2 clip of the hypergradient.
        normalize: divide each window's hypergradient ``g`` by ``||g||_2`` (all raw values
            together) before the outer step; with ``optimizer="sgd"`` every hyper-step moves
            the raw values by exactly ``lr`` (times the guard's scale) along ``-g / ||g||``.
        schedule: outer learning rate ``"constant"`` or ``"cosine"`` (decay to 0 over the
            run's windows).
        val_batch_size: rows of the validation split per hyper-step (``None``: all of it).
        selection: batches never used by hypergradients; their loss is recorded every
            ``eval_every`` hyper-steps (and at the last one).
        seed: seed of the validation-batch draws.
        engine: forward-mode engine (``"double_vjp"`` or ``"jvp"``).
        solver: linear solver of ``"implicit"`` (a Solver, ``"cg"`` or ``"neumann"``).
        backprop: ``"reverse"`` only: backpropagate through the last ``backprop`` steps of each
            window (the others are trained plainly; cheaper, truncated); ``None``: all K.
        shrink, max_failures, max_loss_ratio: the divergence guard (module doc): outer lr
            factor after a failed window, failures in a row before the run stops, and the
            ratio to the first window's loss above which a loss is absurd.
        horizon, horizon_unit, curvature_scale: ``"curvature"`` only: the tangents forget
            at ``1 - 1 / horizon`` per step (``horizon_unit="steps"``) or at ``max(0, 1 - lr_t
            / horizon)`` (``"lr"``: over an optimization time ``sum_t lr_t`` of ``horizon``);
            ``None``: never; the curvature estimate is ``curvature_scale`` (``None``: the
            training batch's rows) times the average squared gradient.
        hot_start: at 10% of the run, when it trained more than twice the optimization time
            that the values found by then give those steps (:mod:`hyperdiff.tuner.hot_start`):
            ``"restart"`` from theta_0 with those values, the learning rate divided by that
            ratio (once; logged), ``"warn"`` (logged, :attr:`warnings`), or ``"ignore"``;
            ``None``: ``"restart"`` with ``method="curvature"``, else ``"ignore"`` (greedy
            windows lower the learning rate from any start: their short-horizon bias, not a
            hot start).
    """

    def __init__(self, problem: Problem, *, window: int = 1, method: str = "reverse",
                 optimizer: str = "adam", lr: float = 0.01, schedule: str = "constant",
                 clip: float | None = None,
                 val_batch_size: int | None = None, selection: Batch | list[Batch] | None = None,
                 eval_every: int = 0, seed: int = 0, engine: str = "double_vjp",
                 solver: Solver | str = "cg", backprop: int | None = None,
                 shrink: float = 0.5, max_failures: int = 5, max_loss_ratio: float = 1e6,
                 normalize: bool = False, horizon: float | None = 500,
                 horizon_unit: str = "steps", curvature_scale: float | None = None,
                 hot_start: str | None = None):
        if not isinstance(problem, Problem):
            raise fail("OnlineTuner", "problem", "a hd.Problem made by hd.make_problem", problem)
        method_of = window_method(method, problem, engine=engine, solver=solver,
                                  backprop=backprop, horizon=horizon,
                                  horizon_unit=horizon_unit, curvature_scale=curvature_scale)
        if optimizer not in OPTIMIZERS:
            raise fail("OnlineTuner", "optimizer", f"one of {sorted(OPTIMIZERS)}", optimizer)
        if schedule not in SCHEDULES:
            raise fail("OnlineTuner", "schedule", f"one of {list(SCHEDULES)}", schedule)
        for coef_name, coef in problem.optimizer.coefficients.items():
            if isinstance(coef, Schedule) and coef.steps != problem.steps:
                raise HyperdiffError(
                    f"OnlineTuner: the {coef.family} schedule of {coef_name} must be defined over "
                    f"the run's {problem.steps} steps (got {coef.steps}); use "
                    f"schedule.with_steps({problem.steps})")
        self.window_method = method_of
        self.problem, self.method, self.schedule = problem, method, schedule
        self.engine, self.solver = engine, method_of.options.get("solver")
        self.backprop = method_of.options.get("k")
        self.window = positive_int("OnlineTuner", "window", window)
        self.lr = float(lr) if lr == 0 else positive_float("OnlineTuner", "lr", lr)
        self.clip = None if clip is None else positive_float("OnlineTuner", "clip", clip)
        self.val_batch_size = None if val_batch_size is None else positive_int(
            "OnlineTuner", "val_batch_size", val_batch_size)
        self.selection = None if selection is None else (
            list(selection) if isinstance(selection, list) else [selection])
        self.eval_every = nonnegative_int("OnlineTuner", "eval_every", eval_every)
        self.seed = nonnegative_int("OnlineTuner", "seed", seed)
        if not isinstance(normalize, bool):
            raise fail("OnlineTuner", "normalize", "True or False", normalize)
        self.normalize = normalize
        if hot_start is None:  # measured for the long-horizon signal only (module doc)
            hot_start = "restart" if method == "curvature" else "ignore"
        if hot_start not in HOT_START_MODES:
            raise fail("OnlineTuner", "hot_start", f"None or one of {list(HOT_START_MODES)}",
                       hot_start)
        self.hot_start = hot_start
        self.hot_start_measure: tuple[int, float] | None = None
        self.restarted = False
        if not (is_number(shrink) and 0.0 < shrink < 1.0):  # the guard's own check, any type
            raise fail("OnlineTuner", "guard shrink", "in (0, 1)", shrink)
        self.guard = DivergenceGuard(shrink=shrink, max_failures=max_failures,
                                     max_loss_ratio=max_loss_ratio, caller="OnlineTuner")
        self.hparams = problem.hparams
        # one flat leaf of all raw values: one tensor for torch.optim to step per window
        self.flat = self.hparams.flatten(self.hparams.raw).clone().requires_grad_()
        self.optimizer = getattr(torch.optim, OPTIMIZERS[optimizer])([self.flat], lr=self.lr)
        with torch.no_grad():
            self.state = initial_state(problem, differentiable=False)
        self.tangent: Any = None
        self.inner_step = 0
        self.history = History()
        self._elapsed = 0.0

    # ------------------------------------------------------------------ the loop
    @property
    def raw(self) -> dict[str, Tensor]:
        """Current raw values (detached copies)."""
        return {n: v.clone() for n, v in self.hparams.unflatten(self.flat.detach()).items()}

    @property
    def done(self) -> bool:
        return self.inner_step >= self.problem.steps

    @property
    def hyper_step(self) -> int:
        return len(self.history)

    def val_batches(self, hyper_step: int) -> list[Batch]:
        """The validation batch of hyper-step ``h``: ``val_batch_size`` rows drawn from
        ``(seed, h)`` out of validation batch ``h mod len(val_data)`` (all batches if None)."""
        batches = self.problem.val_data
        if self.val_batch_size is None:
            return batches
        batch = batches[hyper_step % len(batches)]
        leaves, spec = tree_flatten(batch)
        rows_total = leaves[0].shape[0]
        size = min(self.val_batch_size, rows_total)
        gen = torch.Generator().manual_seed(window_seed(self.seed, hyper_step))
        rows = torch.randperm(rows_total, generator=gen, device=gen.device)[:size]
        rows = rows.to(leaves[0].device)
        if isinstance(batch, tuple):
            return [tuple(x[rows] for x in batch)]
        return [tree_unflatten([x[rows] for x in leaves], spec)]

    def step(self) -> StepRecord:
        """Train one window, take its hypergradient, update the hyperparameters."""
        if self.done:
            raise HyperdiffError(f"OnlineTuner.step: the run of {self.problem.steps} inner steps "
                                 "is finished (got a call after its last window)")
        started = time.perf_counter()
        start, stop = self.inner_step, min(self.inner_step + self.window, self.problem.steps)
        raw = self.problem.raw_tensors(self.raw)
        natural = natural_values(self.hparams, raw)
        snapshot = {"raw": self.raw, "outer": copy.deepcopy(self.optimizer.state_dict())}
        outer_lr = self.outer_lr(start // self.window)
        try:
            self.guard.check_values(self.hparams, raw)
            val = self.val_batches(self.hyper_step)
            out = self._window(raw, start, stop, val)
            grad = {n: g.detach().to(torch.float64) for n, g in out.grad.items()}
            for name, g in grad.items():
                if not torch.isfinite(g).all():
                    raise NonFiniteError(f"online {self.method}: the hypergradient of {name!r} "
                                         f"is not finite in the window of steps "
                                         f"{start}..{stop - 1}")
            norm = float(flat(grad.values()).norm())
            flat_grad = self.hparams.flatten(grad)
            self.flat.grad = flat_grad / norm if self.normalize and norm > 0 else flat_grad
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_([self.flat], self.clip)
            for group in self.optimizer.param_groups:
                group["lr"] = outer_lr
            self.optimizer.step()
            selection = None
            if self.selection and (stop >= self.problem.steps or (
                    self.eval_every and (self.hyper_step + 1) % self.eval_every == 0)):
                selection = self.selection_loss(out.state)
            self.guard.check_losses([out.value], selection,
                                    untrained=lambda: self._untrained(raw, val))
        except NonFiniteError as err:
            return self._failed(natural, start, stop, outer_lr, str(err), started)
        self.guard.succeeded(snapshot)
        self.state, self.tangent, self.inner_step = out.state, out.carry, stop
        now = time.perf_counter()
        self._elapsed += now - started
        record = StepRecord(
            step=self.hyper_step, hparams=natural, status="ok",
            train_loss=finite_or_none(float(out.train_losses.mean())),
            val_loss=finite_or_none(out.value), val_loss_std=0.0, selection_loss=selection,
            grad_norm=norm, grad_std=None, grad={n: to_number(g) for n, g in grad.items()},
            lr=outer_lr, best=False, trainings=1, message="", time_s=self._elapsed,
            step_time_s=now - started,
        )
        restart = measure_hot_start(self, record, start, stop)
        if restart:
            record = replace(record, message=self.warnings[0])
        self.history.append(record)
        if restart:
            restart_cooler(self)
        return record

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the run found suspect: a start hotter than the values it found
        (:mod:`hyperdiff.tuner.hot_start`), and whether it restarted for it."""
        return hot_start_warnings(self)

    def outer_lr(self, window: int) -> float:
        """The outer learning rate of the run's window ``w`` (its first step ``w K``): ``lr``
        times the guard's scale, times ``(1 + cos(pi w / W)) / 2`` over the run's ``W``
        windows with ``schedule="cosine"``."""
        if self.schedule == "constant":
            return self.lr * self.guard.scale
        windows = -(-self.problem.steps // self.window)
        return self.lr * self.guard.scale * 0.5 * (1.0 + math.cos(math.pi * window / windows))

    def _failed(self, natural: dict[str, Any], start: int, stop: int, outer_lr: float,
                reason: str, started: float) -> StepRecord:
        """Discard the failed window (module doc) and record it; re-raise when the guard
        gives up."""
        try:
            good, message = self.guard.failed(self.hyper_step, reason)
            message = (f"{message}; training goes on from inner step {start}, the parameters "
                       "and optimizer state before the failed window")
        except NonFiniteError as err:
            good, message = None, str(err)
        if good is not None:
            with torch.no_grad():
                self.flat.copy_(self.hparams.flatten(good["raw"]))
            self.optimizer.load_state_dict(copy.deepcopy(good["outer"]))
        self.flat.grad = None
        now = time.perf_counter()
        self._elapsed += now - started
        self.history.append(StepRecord(
            step=self.hyper_step, hparams=natural, status="failed", train_loss=None,
            val_loss=None, val_loss_std=None, selection_loss=None, grad_norm=None,
            grad_std=None, grad=None, lr=outer_lr, best=False, trainings=1, message=message,
            time_s=self._elapsed, step_time_s=now - started))
        if good is None:
            raise NonFiniteError(message)
        _LOG.warning("OnlineTuner: window of steps %d..%d: %s", start, stop - 1, message)
        return self.history[-1]

    def _window(self, raw: dict[str, Tensor], start: int, stop: int, val: list[Batch]
                ) -> Segment:
        return self.window_method.segment(self.problem, self.state, raw, start, stop, val,
                                          self.tangent)

    def _untrained(self, raw: dict[str, Tensor], val: list[Batch]) -> dict[str, float]:
        """The untrained model's loss (theta_0) on the window's validation batches ``val``
        (and the selection batches) at ``raw``: the guard's reference at the first window."""
        problem = self.problem
        losses = {"validation": untrained_loss(problem, problem.params, problem.buffers, raw,
                                               val)}
        if self.selection is not None:
            losses["selection"] = untrained_loss(problem, problem.params, problem.buffers, raw,
                                                 self.selection)
        return losses

    def selection_loss(self, state: TrainState | None = None) -> float:
        """The validation loss on the selection batches at the current parameters (or at
        ``state``'s)."""
        if self.selection is None:
            raise HyperdiffError("OnlineTuner.selection_loss: the tuner was made without "
                                 "selection batches (got selection=None)")
        hview = self.hparams.view(self.problem.raw_tensors(self.raw))
        state = self.state if state is None else state
        with torch.no_grad():
            value = validation_loss(replace(self.problem, val_data=self.selection),
                                    state.params, state.buffers, hview)
        return float(value)

    def run(self, callbacks: Sequence[Callback] = (), progress: bool | None = False
            ) -> OnlineResult:
        """Step until the N inner steps are trained; ``callbacks(tuner, record)`` after each."""
        from tqdm.auto import tqdm

        total = -(-self.problem.steps // self.window)
        bar = tqdm(total=total, initial=self.hyper_step, unit="window",
                   disable=None if progress is None else not progress, leave=False)
        try:
            while not self.done:
                record = self.step()
                for callback in callbacks:
                    callback(self, record)
                bar.update(1)
        finally:
            bar.close()
        return self.result()

    def result(self) -> OnlineResult:
        return OnlineResult(
            final_raw=self.raw, final_hparams=self.hparams.with_raw(self.raw),
            params=dict(self.state.params), buffers=dict(self.state.buffers),
            history=History(list(self.history)), steps=self.inner_step,
            hyper_steps=self.hyper_step, time_s=self._elapsed, warnings=self.warnings)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors, numbers, strings only; see
        :mod:`hyperdiff.tuner.online_checkpoint`)."""
        return tuner_state(self)

    def load_state_dict(self, state: dict[str, Any],
                        records: Sequence[StepRecord] | None = None) -> None:
        """Restore :meth:`state_dict`; ``records`` (e.g. from the run directory) replace the
        history it holds."""
        restore_tuner(self, state, records)


__all__ = ["METHODS", "OnlineResult", "OnlineTuner"]
