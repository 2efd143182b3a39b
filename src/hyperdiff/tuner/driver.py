"""The outer loop as a library object: :class:`HyperOptimizer`.

At outer step ``s`` with raw hyperparameters ``u_s`` (natural values ``lam_s = f(u_s)``)::

    for each problem j (one, or one per cross-validation fold) and sample i < samples:
        train T inner steps from theta_0 (or, with warm_start, from that slot's last theta)
        with minibatch seed seed(s, i): theta_T(lam_s); L_ji = L_val(theta_T), g_ji = dL_ji/du
    g_s = mean_ji g_ji   (spread: std_ji g_ji)
    u_{s+1} = optimizer step on g_s (sign agreement by default, hyperdiff.tuner.outer_steps;
              optional clipping and cosine decay)

The loop keeps the ``lam_s`` with the lowest *selection* loss, computed on a split the
hypergradient never sees (the validation loss when there is no selection split), stops on a
budget, on early stopping or on convergence, and survives divergence (see
:mod:`hyperdiff.tuner.guard`). It is shaped like an Optuna study: :meth:`HyperOptimizer.step` runs
one outer step and returns its immutable :class:`~hyperdiff.tuner.history.StepRecord`;
:meth:`HyperOptimizer.run` loops until a stopping rule fires. :meth:`state_dict` holds all that a
checkpoint needs to resume the run exactly.

The trainings of a step (seeds, warm starts, ``samples="auto"``, the selection loss and the
combined hypergradient) are :class:`~hyperdiff.tuner.sampler.Sampler`'s, the checks of the arguments
and of a checkpoint are in :mod:`hyperdiff.tuner.driver_checks`, the stopping rules and the ranking
of steps in :mod:`hyperdiff.tuner.stopping`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.data import FullBatch
from hyperdiff.engine.problem import Problem
from hyperdiff.errors import (
    HyperdiffError,
    NonFiniteError,
    fail,
    nonnegative_int,
    positive_float,
    positive_int,
)
from hyperdiff.logs import get_logger
from hyperdiff.methods.base import Method
from hyperdiff.methods.registry import SCHEDULES, make_method, methods_where
from hyperdiff.tuner.discrete_outer import outer_hook
from hyperdiff.tuner.distributed.spread import spreader_for
from hyperdiff.tuner.driver_checks import (
    as_batches,
    auto_samples,
    check_driver_state,
    check_problems,
    check_selection,
)
from hyperdiff.tuner.guard import DivergenceGuard, untrained_loss
from hyperdiff.tuner.history import (
    History,
    OptimizeResult,
    StepRecord,
    finite_or_none,
    natural_values,
    to_number,
)
from hyperdiff.tuner.outer_steps import DEFAULT_OFFLINE, offline_optimizers, outer_optimizer
from hyperdiff.tuner.sampler import Sampler
from hyperdiff.tuner.snr import more_samples_advice
from hyperdiff.tuner.stopping import Stopping, ranking_loss, ranking_name, tied
from hyperdiff.typing import Batch
from hyperdiff.wording import option

Callback = Callable[["HyperOptimizer", StepRecord], None]
_LOG = get_logger("driver")


class HyperOptimizer:
    """Hypergradient descent on the hyperparameters of one or more inner problems.

    Args:
        problem: a :class:`~hyperdiff.engine.problem.Problem`, or a sequence of problems with the
        same
            hyperparameters (cross-validation folds) whose validation losses are averaged.
        method: a :class:`~hyperdiff.methods.base.Method` usable offline or its name
            (:data:`~hyperdiff.methods.registry.METHODS`).
        optimizer: outer optimizer, a name in
            :func:`~hyperdiff.tuner.outer_steps.offline_optimizers`: torch.optim's ``adam``,
            ``adamw``, ``sgd``, ``rmsprop``, or ``signstep`` (the default, measured across
            tasks: docs/driver.md) and ``trust`` (:mod:`hyperdiff.tuner.outer_steps`).
        lr: outer learning rate in raw units (0.05 moves a log-constrained value by ~5%; with
            ``signstep`` the first step of every coordinate, which grows up to 10x).
        clip: clip the raw hypergradient to this L2 norm (``None``: no clipping).
        schedule: ``"cosine"`` (decay to 0 over ``stopping.max_steps``, the default, as in
            ``hyperdiff run``) or ``"constant"``.
        samples: trainings per step with different minibatch seeds; their hypergradients are
            averaged (variance reduction), their spread and signal-to-noise ratio are recorded
            (:mod:`hyperdiff.tuner.snr`), and a ratio below 1 is logged as a warning. ``"auto"``:
            2 samples, then one more at a time until the ratio reaches 1 or ``max_samples``.
        max_samples: the most samples per step with ``samples="auto"``.
        tie_steps: for the first ``tie_steps`` outer steps every vector hyperparameter moves as
            one: its update uses the mean of its raw hypergradient over its entries (coarse to
            fine: the shared level is found before the entries spread; a defence against
            fitting the validation set with many hyperparameters). 0: off.
        warm_start: start each step's training from the previous step's theta_T.
        selection: batches of a split never used for hypergradients; when given, the best
            step and early stopping use its loss (``problem.val_loss`` on these batches). It
            is evaluated once at theta_0 here, so that batches the loss cannot take fail at
            once. Without it a warning is logged: the best step is then picked by the loss
            the hypergradient descends (as ``hyperdiff run`` with ``task.selection_fraction =
            0``).
        seed: base of the per-step minibatch seeds.
        stopping: the :class:`Stopping` rules.
        shrink, max_failures, max_loss_ratio: the divergence guard (:mod:`hyperdiff.tuner.guard`):
            a step fails when training diverges, a loss exceeds ``max_loss_ratio`` x
            max(|initial loss|, 1), or a value leaves its constraint.
        process_group: spread the trainings of each step over the ranks of this
            ``torch.distributed`` group (``None``: the initialised default group, if any; see
            :mod:`hyperdiff.tuner.distributed`). Every rank then holds the single-process result.

    >>> import torch, hyperdiff as hd
    >>> from hyperdiff.tuner.driver import HyperOptimizer, Stopping
    >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    >>> val = lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()
    >>> loss = lambda p, h, b: val(p, h, b) + h["lam"] * p["w"].square().sum()
    >>> problem = hd.make_problem(loss, val, hd.HyperParameters(lam=hd.scalar(1.0)),
    ...     {"w": torch.zeros(3, dtype=torch.float64)}, optimizer=hd.sgd(0.1),
    ...     train_data=(x, y), val_data=(x, y), steps=20)
    >>> result = HyperOptimizer(problem, lr=0.2, stopping=Stopping(max_steps=5)).run()
    >>> result.steps, result.history[-1].val_loss < result.history[0].val_loss
    (5, True)
    """

    def __init__(
        self,
        problem: Problem | Sequence[Problem],
        *,
        method: Method | str = "reverse",
        optimizer: str = DEFAULT_OFFLINE,
        lr: float = 0.05,
        clip: float | None = None,
        schedule: str = "cosine",
        samples: int | str = 1,
        max_samples: int = 16,
        tie_steps: int = 0,
        warm_start: bool = False,
        selection: Batch | list[Batch] | None = None,
        seed: int = 0,
        stopping: Stopping | None = None,
        shrink: float = 0.5,
        max_failures: int = 5,
        max_loss_ratio: float = 1e6,
        process_group: Any = None,
    ):
        self.problems = check_problems(problem)
        self.hparams = self.problems[0].hparams
        self.method = make_method(method) if isinstance(method, str) else method
        if not isinstance(self.method, Method) or not self.method.capabilities.offline:
            raise fail("HyperOptimizer", "method", "a Method usable offline or one of "
                       f"{sorted(methods_where(offline=True))}", self.method)
        if optimizer not in offline_optimizers():
            raise fail("HyperOptimizer", "optimizer", f"one of {sorted(offline_optimizers())}",
                       optimizer)
        if schedule not in SCHEDULES:
            raise fail("HyperOptimizer", "schedule", f"one of {list(SCHEDULES)}", schedule)
        self.lr = positive_float("HyperOptimizer", "lr", lr)
        self.clip = None if clip is None else positive_float("HyperOptimizer", "clip", clip)
        self.schedule = schedule
        self.auto = auto_samples(samples, max_samples)
        self.samples = self.auto.maximum if self.auto else positive_int(
            "HyperOptimizer", "samples", samples)  # the stride of seeds and warm slots
        self.tie_steps = nonnegative_int("HyperOptimizer", "tie_steps", tie_steps)
        self.warm_start = bool(warm_start)
        self.selection = as_batches(selection)
        check_selection(self.problems[0], self.selection)
        if self.auto is None and self.samples == 1 and not all(
                isinstance(p.train_data, FullBatch) for p in self.problems):
            _LOG.info("HyperOptimizer: %s with minibatches: the hypergradient's noise is "
                      "not measured; %s measures its signal-to-noise ratio and draws enough "
                      "samples", option("samples=1", "outer.samples = 1"),
                      more_samples_advice(False, 1))
        self.seed = nonnegative_int("HyperOptimizer", "seed", seed)
        self.stopping = stopping or Stopping()
        self.guard = DivergenceGuard(shrink=shrink, max_failures=max_failures,
                                     max_loss_ratio=max_loss_ratio)
        self.leaves = {n: v.clone().requires_grad_() for n, v in self.hparams.raw.items()}
        self.optimizer = outer_optimizer(optimizer)(list(self.leaves.values()), lr=self.lr)
        self.history = History()
        self.step_index = 0
        self.best: dict[str, Any] | None = None
        self.since_best = 0
        self.stopped: str | None = None
        self.discrete = outer_hook(self.hparams, seed=self.seed, samples=self.samples,
                                   max_steps=self.stopping.max_steps, folds=len(self.problems))
        self._elapsed = 0.0
        self._clock: float | None = None
        self.spreader = spreader_for(self.method, process_group)
        self.sampler = Sampler(self.problems, self.method, samples=self.samples, auto=self.auto,
                               seed=self.seed, selection=self.selection,
                               warm_start=self.warm_start, discrete=self.discrete,
                               spreader=self.spreader)

    # ------------------------------------------------------------------ public loop
    @property
    def raw(self) -> dict[str, Tensor]:
        """Current raw values (detached copies)."""
        return {n: v.detach().clone() for n, v in self.leaves.items()}

    @property
    def elapsed(self) -> float:
        """Wall time spent in steps of this run, across resumes."""
        return self._elapsed if self._clock is None else time.perf_counter() - self._clock

    @property
    def trainings(self) -> int:
        """Trainings run so far, across resumes (a failed step counts those it started)."""
        return self.sampler.trainings

    @property
    def warm(self) -> list[Any]:
        """Each slot's last ``(params, buffers)`` with warm starts, else ``None`` (see
        :class:`~hyperdiff.tuner.sampler.Sampler`)."""
        return self.sampler.warm

    def seed_for(self, step: int, sample: int) -> int:
        """Minibatch seed of ``sample`` at outer ``step``."""
        return self.sampler.seed_for(step, sample)

    def stop_reason(self) -> str | None:
        """Why the loop should stop now, or ``None`` to go on."""
        return self.stopped or self.stopping.reason(
            steps=self.step_index, elapsed=self.elapsed, since_best=self.since_best,
            has_selection=bool(self.selection))

    def run(self, callbacks: Sequence[Callback] = (), progress: bool | None = False
            ) -> OptimizeResult:
        """Call :meth:`step` until :meth:`stop_reason` fires; return the result.

        ``callbacks(optimizer, record)`` run after every step (also after a failed one that
        ends the run). ``progress``: a tqdm bar (``None``: only on a terminal).
        """
        from tqdm.auto import tqdm

        bar = tqdm(total=self.stopping.max_steps, initial=self.step_index, unit="step",
                   disable=None if progress is None else not progress, leave=True)
        try:
            while self.stop_reason() is None:
                try:
                    record = self.step()
                except NonFiniteError:
                    for callback in callbacks:
                        callback(self, self.history[-1])
                    raise
                for callback in callbacks:
                    callback(self, record)
                bar.update(1)
                if record.criterion is not None:
                    bar.set_postfix(loss=f"{record.criterion:.4g}", refresh=False)
        finally:
            bar.close()
        return self.result()

    def result(self) -> OptimizeResult:
        """The best hyperparameters so far, the history and the stop reason."""
        if self.best is None:
            raise HyperdiffError("HyperOptimizer: no successful step yet, so no result")
        return OptimizeResult(
            best_raw=dict(self.best["raw"]),
            best_hparams=self.hparams.with_raw(self.best["raw"]),
            best_step=int(self.best["step"]),
            best_loss=float(self.best["value"]),
            criterion=ranking_name(self.tie_steps, self.selection is not None),
            final_raw=self.raw,
            history=History(list(self.history)),
            stop_reason=self.stop_reason() or "not finished",
        )

    def step(self) -> StepRecord:
        """One outer step: train, hypergradient, update; return its record.

        Raises:
            NonFiniteError: when the divergence guard gives up (see :mod:`hyperdiff.tuner.guard`).
        """
        if self._clock is None:
            self._clock = time.perf_counter() - self._elapsed
        started = time.perf_counter()
        step, raw = self.step_index, self.raw
        snapshot = {"raw": raw, "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                    "warm": list(self.warm)}
        lr = self.learning_rate(step)
        self.sampler.trainings += self.sampler.first_round
        try:
            self.guard.check_values(self.hparams, raw)
            evaluations, selection = self.sampler.evaluate(step, raw)
            self.guard.check_losses([hg.value for hg in evaluations], selection,
                                    untrained=lambda: self._untrained(raw))
        except NonFiniteError as err:
            return self._failed(step, raw, lr, str(err), started)
        self.guard.succeeded(snapshot)
        grads, values, mean, per_sample, snr, discrete = self.sampler.estimate(
            step, raw, evaluations)
        val = float(values.mean())
        self._update(tied(self.hparams.unflatten(mean)) if step < self.tie_steps
                     else self.hparams.unflatten(mean), lr, val if selection is None else selection)
        is_best = self._rank(step, raw, val, selection)
        moved = max(float((self.leaves[n].detach() - raw[n]).abs().max()) for n in raw)
        grad_norm = float(mean.norm())
        if grad_norm < self.stopping.grad_tol or moved < self.stopping.step_tol:
            self.stopped = (f"converged: hypergradient norm {grad_norm:.3g}, largest raw step "
                            f"{moved:.3g}")
        return self._record(
            step, raw, started, status="ok", lr=lr, best=is_best,
            train_loss=sum(hg.train_loss for hg in evaluations) / len(evaluations),
            val_loss=val,
            val_loss_std=float(values.std()) if len(values) > 1 else 0.0,
            selection_loss=selection, grad_norm=grad_norm,
            grad_std=float(grads.std(0).norm()) if len(grads) > 1 else None,
            grad={n: to_number(g) for n, g in self.hparams.unflatten(mean).items()},
            grad_snr=snr, samples=per_sample.shape[0],
            discrete=discrete,
        )

    def learning_rate(self, step: int) -> float:
        """Outer learning rate of ``step``: base x guard scale x schedule."""
        factor = 1.0
        if self.schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * step / self.stopping.max_steps))
        return self.lr * self.guard.scale * factor

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (the history is kept by the caller)."""
        return {
            "step": self.step_index, "raw": self.raw, "optimizer": self.optimizer.state_dict(),
            "guard": self.guard.state_dict(), "best": self.best, "since_best": self.since_best,
            "warm": self.warm, "elapsed": self.elapsed, "trainings": self.trainings,
            "stopped": self.stopped, "rng": torch.get_rng_state(),
            **({} if self.discrete is None else {"discrete": self.discrete.state_dict()}),
        }

    def load_state_dict(self, state: dict[str, Any], history: Sequence[StepRecord]) -> None:
        """Restore :meth:`state_dict` and the first ``state["step"]`` history records."""
        check_driver_state(self, state, history)
        with torch.no_grad():
            for name, leaf in self.leaves.items():
                leaf.copy_(state["raw"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.guard.load_state_dict(state["guard"])
        self.best, self.since_best = state["best"], int(state["since_best"])
        self.sampler.warm = list(state["warm"])
        self.sampler.trainings = int(state["trainings"])
        self.step_index, self.stopped = int(state["step"]), state["stopped"]
        self._elapsed, self._clock = float(state["elapsed"]), None
        self.history = History(list(history))
        torch.set_rng_state(state["rng"])
        if self.discrete is not None:
            self.discrete.load_state_dict(state["discrete"])

    # ------------------------------------------------------------------ internals
    def _update(self, grad: dict[str, Tensor], lr: float, loss: float) -> None:
        """Step the outer optimizer on ``grad`` at ``lr``; ``loss`` (the ranking loss at the
        current values) reaches it as ``step(closure)``, for those that use it."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for name, leaf in self.leaves.items():
            leaf.grad = grad[name].detach().to(device=leaf.device, dtype=leaf.dtype, copy=True)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.leaves.values()), self.clip)
        self.optimizer.step(lambda: loss)
        self.optimizer.zero_grad(set_to_none=True)

    def _untrained(self, raw: dict[str, Tensor]) -> dict[str, float]:
        """The untrained model's mean validation (and selection) loss over the problems at
        ``raw``: the divergence guard's reference for the first step's losses."""
        losses = {"validation": [untrained_loss(p, p.params, p.buffers, raw)
                                 for p in self.problems]}
        if self.selection is not None:
            losses["selection"] = [untrained_loss(p, p.params, p.buffers, raw, self.selection)
                                   for p in self.problems]
        return {kind: sum(values) / len(values) for kind, values in losses.items()}

    def _rank(self, step: int, raw: dict[str, Tensor], val: float, selection: float | None
              ) -> bool:
        """Whether ``step`` is the new best by its ranking loss (:mod:`hyperdiff.tuner.stopping`):
        the validation loss ``val`` or the ``selection`` loss; counts the steps since."""
        key = ranking_loss(step, self.tie_steps, self.selection is not None)
        criterion = selection if key == "selection" else val
        reference = None if self.best is None else self.best.get(key, self.best["value"])
        is_best = reference is None or criterion < reference - self.stopping.min_delta
        if is_best:
            self.best = {"step": step, "raw": raw, "value": criterion, "val": val,
                         "selection": selection}
            self.since_best = 0
        else:
            self.since_best += 1
        return is_best

    def _failed(self, step: int, raw: dict[str, Tensor], lr: float, reason: str,
                started: float) -> StepRecord:
        self.since_best += 1
        try:
            good, message = self.guard.failed(step, reason)
        except NonFiniteError as err:
            self.stopped = "diverged"
            self._record(step, raw, started, status="failed", lr=lr, message=str(err))
            raise
        with torch.no_grad():
            for name, leaf in self.leaves.items():
                leaf.copy_(good["raw"][name])
        self.optimizer.load_state_dict(copy.deepcopy(good["optimizer"]))
        self.sampler.warm = list(good["warm"])
        return self._record(step, raw, started, status="failed", lr=lr, message=message)

    def _record(self, step: int, raw: dict[str, Tensor], started: float, *, status: str,
                lr: float, best: bool = False, message: str = "", **losses: Any) -> StepRecord:
        fields = ("train_loss", "val_loss", "val_loss_std", "selection_loss", "grad_norm",
                  "grad_std")
        record = StepRecord(
            step=step, hparams=natural_values(self.hparams, raw), status=status,
            **{k: finite_or_none(losses.get(k)) for k in fields}, grad=losses.get("grad"),
            discrete=losses.get("discrete"),
            lr=lr, best=best, trainings=self.trainings, message=message,
            time_s=self.elapsed, step_time_s=time.perf_counter() - started,
            grad_snr=finite_or_none(losses.get("grad_snr")), samples=losses.get("samples"),
        )
        self.history.append(record)
        self.step_index += 1
        return record

