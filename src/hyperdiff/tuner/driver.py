"""The one outer loop as a library object: :class:`HyperOptimizer`, driven by a plan.

At outer step ``s`` with raw hyperparameters ``u_s`` (natural values ``lam_s = f(u_s)``)::

    g_s, losses = plan.evaluate(s, u_s)     what the plan trains (tuner/plan.py):
        offline: every problem (fold) j and sample i retrains T inner steps from theta_0 (or
                 its warm start) with minibatch seed seed(s, i); g_s = mean_ji dL_ji/du
        online:  the window [t, t+K) of the one training, from its current state
    u_{s+1} = optimizer step on g_s         (offline: sign agreement by default,
                                             hyperdiff.tuner.outer_steps; online: Adam;
                                             optional tying, normalizing, clipping, cosine
                                             decay of the outer rate)

Everything around the plan is written once here: the outer optimizer and its leaves, the
learning-rate schedule, the divergence guard with its snapshots (:mod:`hyperdiff.tuner.guard`),
stopping and the best step (:mod:`hyperdiff.tuner.stopping`; an online plan has neither: it
stops when its training ends and reports its final values), the records and the history, the
callbacks, the progress bar, the clock, the checkpoint (:meth:`HyperOptimizer.state_dict`) and
the discrete hooks (:mod:`hyperdiff.tuner.discrete_outer`: temperatures anneal over the plan's
outer steps, REINFORCE estimates the logits' hypergradient in both plans). The loop is shaped
like an Optuna study: :meth:`HyperOptimizer.step` runs one outer step and returns its immutable
:class:`~hyperdiff.tuner.history.StepRecord`; :meth:`HyperOptimizer.run` loops until the plan
or a stopping rule ends it.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import flat
from hyperdiff.errors import (
    NonFiniteError,
    Text,
    fail,
    nonnegative_int,
    positive_float,
)
from hyperdiff.logs import get_logger
from hyperdiff.methods.base import Method
from hyperdiff.methods.registry import SCHEDULES
from hyperdiff.tuner.driver_checks import OPTIMIZER_CLASS, as_batches, check_problems
from hyperdiff.tuner.guard import DivergenceGuard, start_values
from hyperdiff.tuner.history import History, StepRecord, finite_or_none, natural_values
from hyperdiff.tuner.offline_plan import OfflinePlan
from hyperdiff.tuner.outer_steps import SignStep, default_schedule, outer_optimizer
from hyperdiff.tuner.plan import Outcome, Plan
from hyperdiff.tuner.stopping import Stopping, calm, ranking_loss, tied
from hyperdiff.typing import Batch
from hyperdiff.wording import option

Callback = Callable[["HyperOptimizer", StepRecord], None]
_LOG = get_logger("driver")
PLAN_MEMBERS = tuple(sorted({*Plan.__annotations__} | {
    name for name in vars(Plan) if not name.startswith("_")}))  # what a plan must have
RECORD_FIELDS = ("train_loss", "val_loss", "val_loss_std", "selection_loss", "grad_norm",
                 "grad_std", "grad_snr")


class _NotPlainError(Exception):
    """Raised inside :func:`copied_state` for a value it leaves to ``copy.deepcopy``."""


def copied_state(value: Any) -> Any:
    """``copy.deepcopy(value)`` for an optimizer's state dict, cheaper: plain dicts, lists and
    tuples are rebuilt, tensors that need no graph cloned, immutable scalars shared; anything
    else (and a tensor met twice, whose sharing deepcopy keeps) is deep-copied."""
    seen: set[int] = set()

    def one(x: Any) -> Any:
        kind = type(x)
        if kind is dict:
            return {k: one(v) for k, v in x.items()}
        if kind is list:
            return [one(v) for v in x]
        if kind is tuple:
            return tuple(one(v) for v in x)
        if kind is Tensor and not x.requires_grad and id(x) not in seen:
            seen.add(id(x))
            return x.clone(memory_format=torch.preserve_format)
        if x is None or kind in (int, float, bool, str):
            return x
        raise _NotPlainError

    try:
        return one(value)
    except _NotPlainError:
        return copy.deepcopy(value)


class HyperOptimizer:
    """Hypergradient descent on the hyperparameters of one or more inner problems.

    Args:
        problem: a :class:`~hyperdiff.engine.problem.Problem`, or a sequence of problems with
            the same hyperparameters (cross-validation folds, offline) whose validation losses
            are averaged.
        plan: what one outer step trains: :class:`~hyperdiff.tuner.offline_plan.OfflinePlan`
            (the default, built from ``samples``, ``max_samples`` and ``warm_start``) or
            :class:`~hyperdiff.tuner.online_plan.OnlinePlan` (``hd.plans``).
        method: a configured :class:`~hyperdiff.methods.base.Method` or its name
            (:data:`~hyperdiff.methods.registry.METHODS`): usable offline for the offline
            plan, with a segment for the online plan.
        optimizer: outer optimizer, a name in the plan's ``optimizers``: torch.optim's
            ``adam``, ``adamw``, ``sgd``, ``rmsprop``, and offline also ``signstep`` and
            ``trust`` (:mod:`hyperdiff.tuner.outer_steps`); ``None``: the plan's
            ``default_optimizer`` (offline ``signstep``, measured across tasks: docs/driver.md;
            online ``adam``).
        lr: outer learning rate (raw units: 0.05 moves a log-constrained value by ~5%); 0 is
            allowed online (hypergradients are measured, values stay).
        clip: clip the raw hypergradient to this L2 norm (``None``: no clipping).
        schedule: ``"cosine"`` (decay to 0 over the plan's outer steps: ``stopping.max_steps``
            offline, the run's windows online), ``"constant"``, or ``"auto"``: constant with
            ``signstep``, cosine otherwise (:func:`~hyperdiff.tuner.outer_steps.default_schedule`).
        normalize: divide each step's hypergradient ``g`` by ``||g||_2`` (all raw values
            together) before the outer step.
        samples, max_samples, warm_start: the offline plan's (``OfflinePlan``) when ``plan``
            is not given; with a plan they keep their defaults.
        tie_steps: for the first ``tie_steps`` outer steps every vector hyperparameter moves as
            one: its update uses the mean of its raw hypergradient over its entries; counted
            from the plan's first gradient step (after a global phase's points). 0: off; more
            needs a hyperparameter with more than one entry.
        selection: batches of a split never used for hypergradients; offline the best step
            and early stopping use its loss; online it is recorded every ``eval_every``
            windows and at the last one.
        seed: base of the minibatch seeds (offline) or of the validation draws (online), and
            of the discrete draws.
        stopping: the :class:`Stopping` rules (offline).
        shrink, max_failures, max_loss_ratio: the divergence guard (:mod:`hyperdiff.tuner.guard`).
        process_group: offline: spread the trainings of each step over the ranks of this
            ``torch.distributed`` group (``None``: the initialised default group, if any).

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
        plan: Plan | None = None,
        method: Method | str = "reverse",
        optimizer: str | None = None,
        lr: float = 0.05,
        clip: float | None = None,
        schedule: str = "auto",
        normalize: bool = False,
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
        if isinstance(plan, type):
            raise fail("HyperOptimizer", "plan", f"a plan instance, e.g. {plan.__name__}(...), "
                       "not the class itself", plan)
        if plan is not None and (missing := [name for name in PLAN_MEMBERS
                                             if not hasattr(plan, name)]):
            more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
            lacks = ("" if len(missing) == len(PLAN_MEMBERS) else " (this one lacks "
                     f"{', '.join(missing[:4])}{more} of hyperdiff.tuner.plan.Plan)")
            raise fail("HyperOptimizer", "plan", "None or a plan instance, e.g. "
                       f"hd.plans.OfflinePlan(...) or hd.plans.OnlinePlan(...){lacks}", plan)
        if plan is None:
            if not isinstance(warm_start, bool):
                raise fail("HyperOptimizer", "warm_start", "True or False", warm_start)
            plan = OfflinePlan(samples=samples, max_samples=max_samples, warm_start=warm_start)
        else:
            offline = {"samples": (samples, 1), "max_samples": (max_samples, 16),
                       "warm_start": (warm_start, False)}
            for key, (value, default) in offline.items():
                if value is not default and value != default:
                    raise fail("HyperOptimizer", key, f"its default {default!r} when a plan is "
                               "given (the plan takes it: hd.plans.OfflinePlan; "
                               "hd.plans.OnlinePlan(samples=...) for validation samples per "
                               "window)", value)
        self.plan = plan
        caller = plan.caller
        self.problems = check_problems(problem)
        self.hparams = self.problems[0].hparams
        self.method: Any = method
        optimizer = plan.default_optimizer if optimizer is None else optimizer
        if optimizer not in plan.optimizers:
            raise fail(caller, "optimizer", f"one of {sorted(plan.optimizers)}", optimizer)
        if schedule not in ("auto", *SCHEDULES):
            raise fail(caller, "schedule", f"one of {['auto', *SCHEDULES]}", schedule)
        self.lr = (float(lr) if lr == 0 and plan.zero_lr
                   else positive_float(caller, "lr", lr))
        self.clip = None if clip is None else positive_float(caller, "clip", clip)
        self.schedule = default_schedule(optimizer) if schedule == "auto" else schedule
        if not isinstance(normalize, bool):
            raise fail(caller, "normalize", "True or False", normalize)
        self.normalize = normalize
        if optimizer == "signstep" and (self.clip is not None or normalize):
            name, expected, got = ((option("clip", "outer.clip"), "None", self.clip)
                                   if self.clip is not None else
                                   (option("normalize", "outer.normalize"), "False", normalize))
            raise fail(caller, name, f"{expected} with optimizer='signstep' (it moves each "
                       "value by its hypergradient's sign alone, which clipping or normalizing "
                       "the norm does not change)", got)
        self.tie_steps = nonnegative_int(caller, "tie_steps", tie_steps)
        if self.tie_steps and all(v.numel() == 1 for v in self.hparams.raw.values()):
            raise fail(caller, option("tie_steps", "outer.tie_steps"), "0 when no "
                       "hyperparameter has more than one entry (tying moves a vector's "
                       "entries by their mean hypergradient, which changes no value of one "
                       "entry; it would only rank the first steps by the validation loss "
                       f"instead of the selection loss; names: {sorted(self.hparams)})",
                       self.tie_steps)
        # the dtypes training reads the values in (a value valid in float64 may round onto a
        # bound in float32: the guard fails such a step, as make_problem refuses such a start)
        self.value_dtypes = tuple(dict.fromkeys(p.hparam_dtype for p in self.problems))
        self.selection = as_batches(selection)
        self.seed = nonnegative_int(caller, "seed", seed)
        if stopping is not None and not isinstance(stopping, Stopping):
            hint = ("; for a dict of rules: hd.Stopping(**rules)" if isinstance(stopping, dict)
                    else "")
            raise fail(caller, "stopping", "None or hd.Stopping(...), e.g. "
                       f"hd.Stopping(max_steps=20, patience=5){hint}", stopping)
        if stopping is not None and not plan.ranks and stopping != Stopping():
            raise fail(caller, "stopping", "None or Stopping() with a plan that ranks no steps "
                       f"({type(plan).__name__}: one training of problem.steps inner steps, no "
                       "outer-step budget, early stopping or convergence test)", stopping)
        self.stopping = stopping or Stopping()
        self.guard = DivergenceGuard(shrink=shrink, max_failures=max_failures,
                                     max_loss_ratio=max_loss_ratio, caller=caller)
        self.process_group = process_group
        self.discrete: Any = None  # the plan's discrete hook (tuner/discrete_outer.py)
        self.history = History()
        self.step_index = 0
        self.best: dict[str, Any] | None = None
        self.since_best = 0
        self.stopped: str | None = None
        self._elapsed = 0.0
        self._clock: float | None = None
        plan.bind(self)
        raw = self.hparams.raw
        self.leaves = ([self.hparams.flatten(raw).clone().requires_grad_()] if plan.flat_leaf
                       else [v.clone().requires_grad_() for v in raw.values()])
        # the plan's options of the outer optimizer (OnlinePlan(betas=...): Adam's betas)
        self.optimizer = outer_optimizer(optimizer)(self.leaves, lr=self.lr,
                                                    **plan.outer_options(optimizer))

    # ------------------------------------------------------------------ public loop
    @property
    def raw(self) -> dict[str, Tensor]:
        """Current raw values (detached copies)."""
        if self.plan.flat_leaf:
            values = self.hparams.unflatten(self.leaves[0].detach())
            return {n: v.clone() for n, v in values.items()}
        return {n: v.detach().clone() for n, v in zip(self.hparams, self.leaves, strict=True)}

    def set_raw(self, raw: dict[str, Tensor]) -> None:
        """Put ``raw`` into the outer optimizer's leaves (its state is kept)."""
        with torch.no_grad():
            if self.plan.flat_leaf:
                self.leaves[0].copy_(self.hparams.flatten(raw))
            else:
                for name, leaf in zip(self.hparams, self.leaves, strict=True):
                    leaf.copy_(raw[name])

    @property
    def first_gradient_step(self) -> int:
        """The plan's first gradient step (after a global phase's points; else 0), from which
        ``tie_steps`` counts."""
        return int(getattr(self.plan, "gradient_start", 0))

    @property
    def elapsed(self) -> float:
        """Wall time spent in steps of this run, across resumes."""
        return self._elapsed if self._clock is None else time.perf_counter() - self._clock

    @property
    def trainings(self) -> int:
        """Trainings run so far, as the records count them (offline: cumulative)."""
        return self.plan.trainings(self)

    @property
    def done(self) -> bool:
        """Finished: a stopping rule fired, or the plan is done."""
        return self.stop_reason() is not None

    def where(self) -> str:
        """How far the loop is, for log lines: ``"outer step 3"``, ``"inner step 40"``."""
        return self.plan.where(self)

    def stop_reason(self) -> str | None:
        """Why the loop should stop now, or ``None`` to go on."""
        return self.stopped or self.plan.stop_reason(self)

    def run(self, callbacks: Sequence[Callback] = (), progress: bool | None = False) -> Any:
        """Call :meth:`step` until :meth:`stop_reason` fires; return the plan's result
        (offline :class:`~hyperdiff.tuner.history.OptimizeResult`, online
        :class:`~hyperdiff.tuner.online_plan.OnlineResult` with the trained model).

        ``callbacks(optimizer, record)`` run after every step (also after a failed one that
        ends the run); that call is all a callback gets here (a ``start`` or ``close`` method
        it may define is not called: a callback writes each record as it comes, and reads
        ``optimizer.done`` to know the record was the last). ``progress``: a tqdm bar
        (``None``: only on a terminal).
        """
        from tqdm.auto import tqdm

        listed = (None if callable(callbacks) or isinstance(callbacks, (str, bytes))
                  or not isinstance(callbacks, Iterable) else list(callbacks))
        if listed is None or not all(callable(c) for c in listed):
            raise fail("HyperOptimizer.run", "callbacks", "a sequence of functions "
                       "callback(optimizer, record) (one function: callbacks=[fn])", callbacks)
        for k, callback in enumerate(listed):
            check_callback(callback, k)
        if progress is not None and not isinstance(progress, bool):
            raise fail("HyperOptimizer.run", "progress", "True, False or None (a bar only on a "
                       "terminal)", progress)
        callbacks = listed
        if self.stopped == "diverged" and self.history:  # resumed after the guard gave up:
            raise NonFiniteError(self.history[-1].message)  # as the run that saved it did
        bar = tqdm(total=self.plan.schedule_position(self, self.step_index)[1],
                   initial=self.step_index, unit="step",
                   disable=None if progress is None else not progress, leave=self.plan.ranks)
        try:
            while self.stop_reason() is None:
                recorded = len(self.history)
                try:
                    record = self.step()
                except NonFiniteError:
                    if len(self.history) > recorded:  # the guard gave up: its step's record
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

    def result(self) -> Any:
        """The plan's result: the best (offline) or final (online) values and the history."""
        return self.plan.result(self)

    def step(self) -> StepRecord:
        """One outer step: train, hypergradient, update; return its record.

        Raises:
            NonFiniteError: when the divergence guard gives up (see :mod:`hyperdiff.tuner.guard`).
        """
        if self._clock is None:
            self._clock = time.perf_counter() - self._elapsed
        started = time.perf_counter()
        step, stored = self.step_index, self.raw
        snapshot = self.snapshot(stored)
        lr = self.learning_rate(step)
        raw = self.plan.begin(self, step)
        try:
            self.guard.check_values(self.hparams, raw, self.value_dtypes)
            outcome = self.plan.evaluate(self, step, raw)
            if outcome.grad is not None:  # None: a step that tunes nothing (settled online)
                self._update(outcome.grad, step, lr, outcome)
            selection = self.plan.selection_loss(self, outcome)
            self.guard.check_losses(outcome.values, selection, untrained=outcome.untrained)
        except NonFiniteError as err:
            return self._failed(step, raw, lr, str(err), started, snapshot)
        self.guard.succeeded(snapshot)
        if self.discrete is not None:
            self.discrete.commit()
        best, passed = False, ""
        if self.plan.ranks:
            best, passed = self._rank(step, raw, outcome.fields["val_loss"], selection,
                                      outcome.fields.get("grad_norm"))
            if outcome.grad is not None:  # a step without an update says nothing of it
                self._converged(stored, outcome.fields["grad_norm"])
        record = self._make_record(step, raw, started, status="ok", lr=lr, best=best,
                                   selection_loss=selection, **outcome.fields)
        record = self.plan.commit(self, outcome, record)
        if passed:
            record = dataclasses.replace(
                record, message="; ".join(filter(None, (record.message, passed))))
        return self._append(record)

    def learning_rate(self, step: int) -> float:
        """Outer learning rate of ``step``: base x guard scale x schedule, the cosine over the
        plan's outer steps (offline: ``step / max_steps``; online: the window over the run's
        windows, or its first inner step over the run's steps)."""
        return self.lr * self.guard.scale * schedule_factor(
            self.schedule, *self.plan.schedule_position(self, step))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: the loop's entries and the plan's (copies:
        the run going on does not change a state kept in memory)."""
        outer = {**copied_state(self.optimizer.state_dict()),
                 OPTIMIZER_CLASS: type(self.optimizer).__name__}  # torch's load ignores it
        state = {"step": self.step_index, "raw": self.raw, "elapsed": self.elapsed,
                 self.plan.optimizer_key: outer,
                 "guard": self.guard.state_dict()}
        if self.plan.ranks:
            state.update(best=self.best, since_best=self.since_best, stopped=self.stopped)
        if self.discrete is not None:
            state["discrete"] = self.discrete.state_dict()
        return {**state, **self.plan.state_dict(self)}

    def load_state_dict(self, state: dict[str, Any],
                        history: Sequence[StepRecord] | None = None) -> None:
        """Restore :meth:`state_dict` and the first ``state["step"]`` history records (given,
        or, online, those the state holds). A state that does not fit is refused whole
        before anything is changed."""
        records = self.plan.load_state_dict(self, state, history)
        self.set_raw(state["raw"])
        # a copy: torch keeps the given tensors, which the run would then change in ``state``
        self.optimizer.load_state_dict(copied_state(state[self.plan.optimizer_key]))
        if "guard" in state:  # online checkpoints written before the online guard have none
            self.guard.load_state_dict(copy.deepcopy(state["guard"]))
        if self.plan.ranks:
            self.best, self.since_best = state["best"], int(state["since_best"])
            self.stopped = state["stopped"]
        if self.discrete is not None and "discrete" in state:
            self.discrete.load_state_dict(state["discrete"])
        self.step_index = int(state["step"])
        self._elapsed, self._clock = float(state["elapsed"]), None
        self.history = History(list(records))
        if self.guard.failures >= self.guard.max_failures:  # saved after the guard gave up
            self.stopped = "diverged"

    # ------------------------------------------------------------------ internals
    def snapshot(self, raw: dict[str, Tensor]) -> dict[str, Any]:
        """The guard's snapshot at ``raw``: raw values, outer optimizer, the plan's part (taken
        before every step, and by the offline plan where it goes back to the best values)."""
        return {"raw": raw,
                self.plan.optimizer_key: copied_state(self.optimizer.state_dict()),
                **self.plan.snapshot()}

    def _update(self, grad: dict[str, Tensor], step: int, lr: float, outcome: Outcome
                ) -> None:
        """One outer step on ``grad`` (float64 by name): tied, normalized, clipped, and kept as
        the outcome's ``step_rule`` says (online: a move that lowers the learning rate
        shortened). A plan that ranks its steps hands the optimizer the ranking loss of the
        values it steps from (the selection loss, else the validation loss) as
        ``step(closure)``, for the optimizers that read it (``trust``)."""
        if step < self.first_gradient_step + self.tie_steps:
            grad = tied(grad, self.hparams)
        if self.normalize:
            norm = float(flat(grad.values()).norm())
            grad = {n: g / norm for n, g in grad.items()} if norm > 0 else grad
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.plan.flat_leaf:
            self.leaves[0].grad = self.hparams.flatten(grad)
        else:
            for name, leaf in zip(self.hparams, self.leaves, strict=True):
                leaf.grad = grad[name].detach().to(device=leaf.device, dtype=leaf.dtype,
                                                   copy=True)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.leaves, self.clip)
        rule = outcome.step_rule
        before = self.raw if rule is not None else {}
        if self.plan.ranks:
            self.optimizer.step(lambda: self._ranking_value(outcome))
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if rule is not None:  # the plan's say on the move
            self.set_raw(rule(before, self.raw))

    def _ranking_value(self, outcome: Outcome) -> float:
        selection = self.plan.selection_loss(self, outcome)
        return float(outcome.fields["val_loss"] if selection is None else selection)

    def _rank(self, step: int, raw: dict[str, Tensor], val: float, selection: float | None,
              grad_norm: float | None) -> tuple[bool, str]:
        """Whether ``step`` is the new best by its ranking loss (:mod:`hyperdiff.tuner.stopping`):
        the validation loss ``val`` or the ``selection`` loss, a calm step above every chaotic
        one (``grad_norm``; where the plan reads ``stopping.chaos_ratio``); counts the steps
        since. Also the record's note when a lower loss was passed over as chaotic."""
        key = ranking_loss(step, self.tie_steps, selection is not None,
                           self.first_gradient_step)
        criterion = selection if key == "selection" else val
        is_best, lower = self.ranks_above_best(key, criterion, val, grad_norm)
        ratio = self.stopping.chaos_ratio
        passed = ""
        if lower and not is_best and self.best is not None:
            passed = (f"not ranked above step {self.best['step']} although its {key} loss is "
                      f"lower: its hypergradient norm {grad_norm:.3g} is above "
                      f"{option('chaos_ratio', 'stop.chaos_ratio')} {ratio:g} x "
                      "max(|validation loss|, 1) (chaotic)")
        if is_best:
            self.best = {"step": step, "raw": raw, "value": criterion, "val": val,
                         "selection": selection}
            self.since_best = 0
        else:
            self.since_best += 1
        return is_best, passed

    def ranks_above_best(self, key: str, criterion: float | None, val: float,
                         grad_norm: float | None) -> tuple[bool, bool]:
        """Whether a step with ranking loss ``criterion`` (of kind ``key``), validation loss
        ``val`` and hypergradient norm ``grad_norm`` would be the new best (a calm step above
        every chaotic one, then the lower loss), and whether its loss is lower."""
        reference = None if self.best is None else self.best.get(key, self.best["value"])
        lower = reference is None or (criterion is not None
                                      and criterion < reference - self.stopping.min_delta)
        ratio = self.stopping.chaos_ratio if self.plan.reads_chaos else None
        if self.best is None or ratio is None:
            return lower, lower
        quiet = calm(grad_norm, val, ratio)
        incumbent = self._calm_step(int(self.best["step"]), ratio)
        return (quiet and not incumbent) or (quiet == incumbent and lower), lower

    def _calm_step(self, step: int, ratio: float | None) -> bool:
        """Whether the recorded ``step`` is calm (:func:`~hyperdiff.tuner.stopping.calm`)."""
        record = next(r for r in reversed(self.history) if r.step == step)
        return calm(record.grad_norm, record.val_loss, ratio)

    def _converged(self, before: dict[str, Tensor], grad_norm: float) -> None:
        """Stop when the hypergradient or the raw step is below its tolerance (``signstep``:
        its step lengths ``lr x scale``, as a flipped sign's skipped step, 0, is no sign of
        convergence)."""
        moved = self._step_length(before)
        if grad_norm < self.stopping.grad_tol or moved < self.stopping.step_tol:
            self.stopped = (f"converged: hypergradient norm {grad_norm:.3g}, largest raw step "
                            f"{moved:.3g}")

    def _step_length(self, before: dict[str, Tensor]) -> float:
        """The largest raw move of the last step; ``signstep``'s largest step length."""
        if isinstance(self.optimizer, SignStep):
            return max(float(group["lr"] * self.optimizer.state[p]["scale"].max())
                       for group in self.optimizer.param_groups for p in group["params"]
                       if p in self.optimizer.state)
        after = self.raw
        return max(float((after[n] - before[n]).abs().max()) for n in before)

    def _failed(self, step: int, raw: dict[str, Tensor], lr: float, reason: str,
                started: float, snapshot: Any) -> StepRecord:
        """Go back to the guard's last good snapshot (a failed start: to the start itself, if
        the plan goes on from it) and record the failure; re-raise when the guard gives up
        (or the plan's note ends the run: the online rescue's last try)."""
        for leaf in self.leaves:
            leaf.grad = None
        if self.plan.ranks:
            self.since_best += 1
        if self.guard.good is None and self.plan.rescue_start(self):
            self.guard.good = snapshot
        try:
            good, message = self.guard.failed(step, reason, start_values(self.hparams, raw),
                                              counted=self.plan.counts_failure(self),
                                              advice=self.plan.give_up_advice(self, raw),
                                              row=self._failed_in_row() + 1)
            self.set_raw(good["raw"])
            self.optimizer.load_state_dict(copy.deepcopy(good[self.plan.optimizer_key]))
            self.plan.restore(good)
            message = self.plan.failure_note(self, message)
        except NonFiniteError as err:
            self.stopped = "diverged"
            self._append(self._make_record(step, raw, started, status="failed", lr=lr,
                                           message=str(err)))
            raise
        return self._append(self._make_record(step, raw, started, status="failed", lr=lr,
                                              message=message))

    def _failed_in_row(self) -> int:
        """The failed records at the end of the history (counted by the guard or not)."""
        row = 0
        for record in reversed(self.history):
            if record.status != "failed":
                break
            row += 1
        return row

    def _make_record(self, step: int, raw: dict[str, Tensor], started: float, *, status: str,
                     lr: float, best: bool = False, message: str = "", **fields: Any
                     ) -> StepRecord:
        return StepRecord(
            step=step, hparams=natural_values(self.hparams, raw), status=status,
            **{k: finite_or_none(fields.get(k)) for k in RECORD_FIELDS},
            grad=fields.get("grad"), discrete=fields.get("discrete"),
            lr=lr, best=best, trainings=self.trainings, message=message,
            time_s=self.elapsed, step_time_s=time.perf_counter() - started,
            samples=fields.get("samples"),
        )

    def _append(self, record: StepRecord) -> StepRecord:
        self.history.append(record)
        self.step_index += 1
        return record


def check_callback(callback: Any, index: int) -> None:
    """Refuse a callback that cannot be called as ``callback(optimizer, record)`` (one whose
    signature Python cannot read is let through)."""
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None)
    except TypeError:
        name = getattr(callback, "__qualname__", type(callback).__name__)
        raise fail("HyperOptimizer.run", f"callbacks[{index}]", "a function taking two "
                   "arguments, callback(optimizer, record)",
                   Text(f"{name}{signature}")) from None


def schedule_factor(schedule: str, index: float, total: int) -> float:
    """The outer learning rate's factor at outer step ``index`` of ``total``: 1 for
    ``"constant"``, ``(1 + cos(pi index / total)) / 2`` for ``"cosine"``."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * index / total))
    return 1.0


__all__ = ["Callback", "HyperOptimizer", "Outcome", "Stopping", "schedule_factor"]
