"""The online plan: one training, and each outer step is a window of it.

With raw hyperparameters ``u`` (natural ``lam = f(u)``) and one run of N inner steps::

    s = s_0 (theta_0, buffers, optimizer state); t = 0; h = 0
    while t < N:
        train steps t .. t+K-1 at lam from s with the method's carry, taking the window
        hypergradient g = dL_val/du at the validation batch B_h:
        method.segment(problem, s, u, t, t+K, B_h, carry) (methods/base.py)
        the loop's outer step on g; t <- t + K; h <- h + 1

Training continues from the current parameters and optimizer state: the whole run costs one
N-step training plus the window hypergradients. With ``growth > 0`` the window from step t is
``K + floor(growth t)`` steps long (:mod:`hyperdiff.tuner.windows`): fewer hypergradients later
in the run, where the values have settled. ``B_h`` is ``val_batch_size`` rows of the
validation split drawn from ``(seed, h)`` (all of it when ``None``), so the run is a function of
its inputs. The training's minibatches and dropout follow ``train_seed`` (``problem.seed`` when
``None``): ``train_data.batch(t, train_seed)``, as a plain training at that seed reads them.

**Settling** (``settle``, ``settle_tol``; :mod:`hyperdiff.tuner.settling`): once the run has
trained a fraction of its steps, or its values stopped changing, the remaining windows are
trained plainly at the values reached (no carry, no validation, no outer step: the loop gets
``grad=None``); the settling window's record says so, and ``settled_at`` is checkpointed.

**Samples** (``samples = m``): the window's trajectory is one (the model being trained is
single); its hypergradient is noisy through the validation batch, so sample ``j`` is the window
hypergradient of the same trajectory at its own batch ``B_h^j`` (rows drawn from ``(seed, h,
j)``, :func:`~hyperdiff.seeds.window_sample_seed`; ``B_h^0 = B_h``)::

    g_h = mean_j g_h^j,   recorded as offline: grad_std, grad_snr, samples, val_loss_std

through ``method.segment_samples`` (one training of the window; per sample only the validation
side: one validation gradient contracted with forward's or curvature's tangents, a share of a
batched backward pass through reverse's window graph, one solve for implicit). With a
REINFORCE choice sample ``j`` also draws its own choice ``z_j`` (seeded by ``(seed, h, j)``), so
it trains the window from the same start with it; the run continues with sample 0's training.
``m`` samples allow the leave-one-out baseline. The combination, the SNR and its warning are
the offline plan's (:func:`~hyperdiff.tuner.sampler.combine`).

The plan's state is the training state, the carry (forward mode's tangents, curvature's
statistics), the inner step and the hot-start measure; its checkpoint part is
:mod:`hyperdiff.tuner.online_checkpoint`.

**Divergence guard** (the loop's, :mod:`hyperdiff.tuner.guard`): a failed window is discarded:
the training state, carry and data position stay at the end of the last good window, the raw
values and the outer optimizer's state go back to the last good window's, and the same window
is trained again (with the next validation draw).

**Broken start** (``rescue = n``, :mod:`~hyperdiff.tuner.online_rescue`): a first window from
theta_0 that the guard fails, that trains far worse than the untrained model or whose
hypergradient is chaotic is recorded as failed, and the run starts over from theta_0 at step 0
with the learning rate cut 10x, at most ``n`` times; then one error naming the rates tried.

**Weak or hot start** (``retry = n``, :mod:`~hyperdiff.tuner.online_retry`): a first window from
theta_0 at whose pace the run would remove under 10% of the untrained model's loss while its
hypergradient asks for a larger learning rate, or that ended 5% above that loss while it asks
for a smaller one, is recorded as
failed, and the run starts over from theta_0 at step 0 with the learning rate 10x larger or
smaller, one way, at most ``n`` times.

**Hot start** (:mod:`~hyperdiff.tuner.hot_start`): at the window that reaches 10% of the run,
a run that trained more than twice the optimization time that its values by then give those
steps started hotter than what it found; with ``hot_start="restart"`` (the default for a
method whose capabilities say ``long_horizon``: ``curvature``) it starts over, once, from
theta_0 at step 0 with those values, the learning rate divided by that ratio.

**Discrete hyperparameters** (:mod:`hyperdiff.tuner.discrete_outer`): a relaxed or Gumbel
choice's temperature anneals over the run's windows (window ``w`` of ``W`` as offline step
``s`` of ``max_steps``); a REINFORCE choice draws one plain choice per window (seeded by
``(seed, h)``) and its logits get the score-function estimate ``(L_h - b) (onehot(z_h) - p)``
(baseline ``"moving_average"`` or ``"none"``; with one sample per window a
``"leave_one_out"`` baseline becomes the moving average, with a warning). Cross-validation
folds are refused (offline only): a window continues one training.

Hyperparameters must be defined for the whole run: a parametric schedule over N steps
(:mod:`hyperdiff.hparams.schedules`), scalars, per-tensor values. A ``per_step`` schedule is
accepted but its entry t receives a hypergradient only after step t has been trained.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor

from hyperdiff.engine.optimizers import check_raw_coefficients
from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import TrainState, initial_state, validation_loss
from hyperdiff.errors import (
    HyperdiffError,
    NonFiniteError,
    Range,
    fail,
    nonnegative_int,
    number,
    positive_int,
)
from hyperdiff.hparams.discrete import DiscreteParameter, discrete_names, label, with_states
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.methods.base import Method, Segment
from hyperdiff.methods.registry import OPTIMIZERS, make_method, methods_where, unread_options
from hyperdiff.methods.window_methods import window_name
from hyperdiff.seeds import window_sample_seed, window_seed
from hyperdiff.tree import tree_flatten, tree_unflatten
from hyperdiff.tuner.discrete_outer import outer_hook
from hyperdiff.tuner.distributed.agree import (
    WORLD_KEY,
    agreed_mean,
    check_ranks_agree,
    torch_world,
)
from hyperdiff.tuner.distributed.data_parallel import DataParallelMethod, world_checked
from hyperdiff.tuner.distributed.group import Group, current_group
from hyperdiff.tuner.guard import UntrainedLosses
from hyperdiff.tuner.history import History, StepRecord, natural_values
from hyperdiff.tuner.hot_start import FRACTION as HOT_START_FRACTION
from hyperdiff.tuner.hot_start import MODES as HOT_START_MODES
from hyperdiff.tuner.hot_start import hot_start_warnings, measure_hot_start, restart_cooler
from hyperdiff.tuner.lowering import lr_direction, shortened
from hyperdiff.tuner.online_checkpoint import restore_tuner, tuner_state
from hyperdiff.tuner.online_rescue import at_start, check_broken, lr_name, start_over
from hyperdiff.tuner.online_retry import check_start, retry_start, stuck_advice
from hyperdiff.tuner.plan import Outcome, bind_once
from hyperdiff.tuner.sampler import combine, estimate_fields, warn_low_snr
from hyperdiff.tuner.settling import Settling, plain_window
from hyperdiff.tuner.windows import window_index, window_starts, window_stop
from hyperdiff.typing import Batch, Params
from hyperdiff.wording import option

_LOG = logging.getLogger("hyperdiff.online")
GROWTH = Range(0.0)  # the windows' growth: a finite number >= 0
BETA = Range(0.0, 1.0, open_high=True)  # one of Adam's betas
ADAM_FAMILY = ("adam", "adamw")  # the outer optimizers whose betas ``betas`` sets
SCHEDULE_OVER = ("windows", "steps")  # what the outer learning rate's cosine runs over
LOWERING = Range(0.0, 1.0, open_low=True)  # the kept fraction of a move that lowers the lr


@dataclass(frozen=True)
class OnlineResult:
    """The outcome of an online run (``HyperOptimizer(plan=OnlinePlan(...)).run()``).

    Attributes:
        final_raw: raw hyperparameters after the last update; ``final_hparams`` holds them.
        params, buffers: the model at the end of the run (trained while tuning).
        history: one :class:`StepRecord` per hyper-step (natural values used in its window).
        steps: the inner step the model ended at (N for a finished run): the steps of the
            model returned, not every step run (a failed window's steps, a rescue's tries and
            the steps before a hot-start restart were trained and discarded; their cost is
            in ``time_s`` and the records' times); ``hyper_steps`` windows, failed ones
            included; ``time_s`` wall time.
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


class OnlinePlan:
    """Tune during one training run of ``problem.steps`` inner steps, a window at a time.

    Args:
        window: K, inner steps per outer step (K=1 with ``reverse``: hypergradient descent).
        growth: a window that starts at inner step t trains ``K + floor(growth * t)`` steps
            (:mod:`hyperdiff.tuner.windows`: dense windows early, sparse ones later); 0: K.
        val_batch_size: rows of the validation split per window (``None``: all of it).
        eval_every: record the selection loss every ``eval_every`` windows (0: only at the
            last one).
        hot_start: at 10% of the run, when it trained more than twice the optimization time
            that the values found by then give those steps (:mod:`hyperdiff.tuner.hot_start`):
            ``"restart"`` from theta_0 with those values (once), ``"warn"``, or ``"ignore"``;
            ``None``: ``"restart"`` for a method whose capabilities say ``long_horizon``
            (``curvature``), else ``"ignore"``.
        samples: validation samples per window (module doc); more than 1 needs
            ``val_batch_size`` or a REINFORCE choice (else they would be identical).
        betas: ``(beta1, beta2)`` of the outer Adam (or AdamW), each in [0, 1): the memories
            of its moving averages ``m = beta1 m + (1 - beta1) g``, ``v = beta2 v + (1 -
            beta2) g^2``, about ``1 / (1 - beta)`` windows; ``None``: torch's (0.9, 0.999). A
            run of a few windows averages its whole history with torch's, so the first,
            largest window hypergradients set the direction and scale of every later step
            (docs/online.md, "When the run ends worse than its start").
        rescue: a broken start (its first window fails, trains to far worse than the
            untrained model, or has a chaotic hypergradient) starts over from theta_0 with
            the learning rate cut 10x, at most this many times
            (:mod:`hyperdiff.tuner.online_rescue`); 0: the guard refuses it.
        train_seed: the seed of the one training's minibatch order and dropout (what
            ``problem.seed`` seeds in a plain training: ``train_data.batch(t, train_seed)``,
            ``StepContext(seed=train_seed)``); ``None``: the problem's own seed. The loop's
            ``seed`` still seeds the validation draws.
        settle, settle_tol: stop tuning once the run has trained the fraction ``settle`` of
            its steps (1: never by it), or once the values' largest relative change over the
            last two windows is below ``settle_tol`` (0: never by it); the rest of the run
            trains plainly at the settled values (:mod:`hyperdiff.tuner.settling`; with a
            data-parallel method every rank trains the whole batch there, as one process
            does). Not with discrete hyperparameters (their windows keep tuning).
        schedule_over: what the loop's cosine decay of the outer learning rate runs over:
            ``"windows"``, window ``h`` of the run's ``W``: factor ``(1 + cos(pi h / W)) / 2``;
            ``"steps"``, the window's first inner step ``t`` of ``N``: ``(1 + cos(pi t / N))
            / 2``. Growing windows make ``h / W`` run ahead of ``t / N`` (the first windows
            are short; most in the middle of the run), so over the windows the rate decays
            faster (docs/online.md, "A cosine over the inner steps").
        lowering: in (0, 1], the fraction of its move that the outer step keeps where it
            lowers the learning rate of the rest of the run (:mod:`hyperdiff.tuner.lowering`:
            a window's hypergradient favours a smaller rate, the short-horizon bias); 1: every
            move as the outer optimizer makes it (docs/online.md, "Why tabular_mlp's online
            run ends worse than not tuning").
        retry: a weak first window (at its pace the run would remove under 10% of the
            untrained loss, and the hypergradient asks for a larger learning rate) or a hot
            one (5% above that loss, asking for a smaller one) starts over from theta_0 with
            the learning rate 10x larger or smaller, one way, at most this many times
            (:mod:`hyperdiff.tuner.online_retry`); 0: never.
    """

    caller = "HyperOptimizer"  # names the loop in messages (the deprecated shim: OnlineTuner)
    flat_leaf = True  # one flat leaf of all raw values (clip_grad_norm_ over it)
    optimizer_key = "outer"
    ranks = False  # no best step: the run's final values and model are its result
    reads_chaos = False
    zero_lr = True  # lr = 0: one training with its window hypergradients measured
    optimizers = tuple(OPTIMIZERS)  # torch.optim's (outer_steps.py's are measured offline)
    default_optimizer = "adam"

    def __init__(self, window: int = 1, val_batch_size: int | None = None, eval_every: int = 0,
                 hot_start: str | None = None, samples: int = 1, growth: float = 0.0,
                 betas: tuple[float, float] | None = None, rescue: int = 0,
                 train_seed: int | None = None, settle: float = 1.0, settle_tol: float = 0.0,
                 schedule_over: str = "windows", lowering: float = 1.0, retry: int = 0):
        self.window = positive_int(self.caller, "window", window)
        self.lowering = number(self.caller, "lowering", lowering, LOWERING)
        if schedule_over not in SCHEDULE_OVER:
            raise fail(self.caller, "schedule_over", f"one of {list(SCHEDULE_OVER)}",
                       schedule_over)
        self.schedule_over = schedule_over
        self.train_seed = None if train_seed is None else nonnegative_int(
            self.caller, "train_seed", train_seed)
        self.betas = None if betas is None else _betas(self.caller, betas)
        self.samples = positive_int(self.caller, "samples", samples)
        self.growth = number(self.caller, "growth", growth, GROWTH)
        self.val_batch_size = None if val_batch_size is None else positive_int(
            self.caller, "val_batch_size", val_batch_size)
        self.eval_every = nonnegative_int(self.caller, "eval_every", eval_every)
        if hot_start is not None and hot_start not in HOT_START_MODES:
            raise fail(self.caller, "hot_start", f"None or one of {list(HOT_START_MODES)}",
                       hot_start)
        self.hot_start = hot_start or "ignore"
        self._hot_start_given = hot_start
        self.hot_start_measure: tuple[int, float] | None = None
        self.rescue = nonnegative_int(self.caller, "rescue", rescue)
        self.rescues = 0
        self.retry = nonnegative_int(self.caller, "retry", retry)
        self.retries = 0  # +k: k warmer tries made, -k: k cooler (tuner/online_retry.py)
        self.pending_retry: dict[str, Tensor] | None = None  # the next try's raw values
        self.restarted = False
        self.tangent: Any = None
        self.inner_step = 0
        self.span: tuple[int, int] = (0, 0)
        # the discrete specs (temperature, Gumbel noise, REINFORCE draw) of the window being
        # evaluated and of the last committed one: what the training state was trained with
        self.window_hparams: HyperParameters | None = None
        self.trained_hparams: HyperParameters | None = None
        self.settling = Settling.checked(self.caller, settle, settle_tol)
        self.settled_at: int | None = None  # the inner step where the plain windows begin
        self._agreed = False  # the ranks' problems were compared (data-parallel windows)

    def bind(self, loop: Any) -> None:
        """Take the loop's one problem and its method (with a segment); start the training."""
        bind_once(self, loop)
        if len(loop.problems) != 1:
            raise fail(self.caller, "problem", "one Problem (an online run is one training; "
                       "cross-validation folds are for the offline plan)",
                       f"{len(loop.problems)} problems")
        if loop.process_group is not None:
            raise fail(self.caller, "process_group", "None (an online run is one training; "
                       "to train its windows on the ranks' shards of every batch pass "
                       "method=hd.distributed.data_parallel(method))", loop.process_group)
        own: Problem = loop.problems[0]  # the one place the online path takes its seed
        self.problem = own if self.train_seed is None else replace(own, seed=self.train_seed)
        method = make_method(loop.method) if isinstance(loop.method, str) else loop.method
        if not isinstance(method, Method) or not method.capabilities.online:
            raise fail(self.caller, "method", "a Method with a segment or one of "
                       f"{sorted(methods_where(online=True))}", method)
        method.check(self.problem)
        unread = unread_options(method)
        if unread:
            name = next(iter(unread))
            raise fail(self.caller, f"method's option {name}",
                       f"its default: an online window reads only "
                       f"{list(method.capabilities.segment_options) or 'no options'} of "
                       f"{method.name}", unread[name])
        loop.method = self.method = method
        self.label = window_name(method)
        if self._hot_start_given is None:  # measured for the long-horizon signal only
            self.hot_start = "restart" if method.capabilities.long_horizon else "ignore"
        for coef_name, coef in self.problem.optimizer.coefficients.items():
            if isinstance(coef, Schedule) and coef.steps != self.problem.steps:
                raise HyperdiffError(
                    f"{self.caller}: the {coef.family} schedule of {coef_name} must be defined "
                    f"over the run's {self.problem.steps} steps (got {coef.steps}); use "
                    f"schedule.with_steps({self.problem.steps})")
        self._check_samples(loop.hparams)
        self._check_read(loop)
        loop.discrete = outer_hook(loop.hparams, seed=loop.seed, samples=self.samples,
                                   max_steps=self.windows, folds=1,
                                   baseline=self._baseline(loop.hparams))
        if loop.seed and self.val_batch_size is None and loop.discrete is None:  # said
            _LOG.warning("%s: %s is not read: it seeds the validation draws of %s and the "
                         "draws of discrete hyperparameters, and this run has neither",
                         self.caller, option(f"seed={loop.seed}", f"outer.seed = {loop.seed}"),
                         option("val_batch_size", "outer.val_batch"))
        self._check_start_tries()
        # a data-parallel run settles too: its plain windows train the whole batch on every
        # rank (the one-process arithmetic), so the ranks' states stay equal
        if loop.discrete is not None:
            if not self.settling.never:  # said, not dropped silently
                _LOG.warning(
                    "%s: %s and %s are not applied: a plain window draws no choice, so every "
                    "window of a run with discrete hyperparameters tunes", self.caller,
                    option(f"settle={self.settling.after:g}",
                           f"outer.settle = {self.settling.after:g}"),
                    option(f"settle_tol={self.settling.tol:g}",
                           f"outer.settle_tol = {self.settling.tol:g}"))
            self.settling = Settling()
        with torch.no_grad():
            self.state: TrainState = initial_state(self.problem, differentiable=False)

    def _check_start_tries(self) -> None:
        """Say that ``rescue`` and ``retry`` do not apply where the learning rate is tuned
        but is not one value to cut (``per_step``, ``per_tensor``, a callable of
        hyperparameters): a broken start then fails and a weak one trains on, as without
        them (a number learning rate is not tuned: nothing to cut, docs/online.md)."""
        coef = self.problem.optimizer.coefficients.get("lr")
        if not (self.rescue or self.retry) or lr_name(self.problem) is not None or not (
                isinstance(coef, str) or callable(coef)):
            return
        _LOG.warning(
            "%s: %s and %s are not applied: they cut or raise one learning rate (a "
            "schedule's peak or a scalar hyperparameter), and this run's lr is %s, so a "
            "broken start fails and a weak one trains on", self.caller,
            option(f"rescue={self.rescue}", f"outer.rescue = {self.rescue}"),
            option(f"retry={self.retry}", f"outer.retry = {self.retry}"),
            f"the {self.problem.hparams[coef].kind} hyperparameter {coef!r}"
            if isinstance(coef, str) else "a function")

    def _check_read(self, loop: Any) -> None:
        """Refuse ``eval_every`` without a selection split: nothing would read it."""
        if self.eval_every and not loop.selection:
            raise fail(self.caller, "eval_every", "0 without a selection split (it records "
                       "the selection loss every eval_every windows; pass selection=batches "
                       "held out from val_data)", self.eval_every)

    def _check_samples(self, hparams: HyperParameters) -> None:
        """Refuse samples that could only repeat one another: with ``val_batch_size=None``
        every sample evaluates the whole validation split, and only REINFORCE draws differ."""
        if self.samples > 1 and self.val_batch_size is None and not _reinforced(hparams):
            raise fail(self.caller, "samples", "1 when every window evaluates the whole "
                       "validation split (val_batch_size=None) and no choice is sampled by "
                       "REINFORCE: its samples would be identical; set val_batch_size "
                       f"({option('val_batch_size', 'outer.val_batch')}) to draw each sample's "
                       "validation rows", self.samples)
        rows = min(tree_flatten(batch)[0][0].shape[0] for batch in self.problem.val_data)
        if (self.samples > 1 and self.val_batch_size is not None
                and self.val_batch_size >= rows and not _reinforced(hparams)):
            raise fail(self.caller, option("val_batch_size", "outer.val_batch"),
                       f"below the rows of every validation batch ({rows} in the smallest) "
                       f"with samples={self.samples}: a sample drawing every row of its batch "
                       "is the same as any other sample", self.val_batch_size)

    def _baseline(self, hparams: HyperParameters) -> str | None:
        """``"moving_average"`` in place of a leave-one-out baseline when a window draws one
        sample (there is no other sample to leave out), with a warning; else None."""
        if self.samples > 1:
            return None
        for name in discrete_names(hparams):
            spec = cast(DiscreteParameter, hparams[name])
            if spec.mode == "reinforce" and spec.baseline == "leave_one_out":
                _LOG.warning(
                    "%s: the REINFORCE baseline of %r is 'leave_one_out', which needs several "
                    "samples per step; this online run draws one per window, so the moving "
                    "average of the past windows' losses (decay %g) is the baseline instead",
                    self.caller, name, spec.decay)
                return "moving_average"
        return None

    def outer_options(self, optimizer: str) -> dict[str, Any]:
        """Keyword options of the outer optimizer named ``optimizer`` (the loop builds it with
        them): ``betas`` for Adam and AdamW when set; refused with another optimizer."""
        if self.betas is None:
            return {}
        if optimizer not in ADAM_FAMILY:
            raise fail(self.caller, "betas", f"None with optimizer={optimizer!r} (they are the "
                       f"betas of {' and '.join(ADAM_FAMILY)})", self.betas)
        return {"betas": self.betas}

    @property
    def windows(self) -> int:
        """The run's windows (``ceil(N / K)`` without growth)."""
        if not self.growth:
            return -(-self.problem.steps // self.window)
        return len(window_starts(self.problem.steps, self.window, self.growth))

    def window_stop(self, start: int) -> int:
        """The end (exclusive) of the window that starts at inner step ``start``."""
        return window_stop(start, self.problem.steps, self.window, self.growth)

    @property
    def done(self) -> bool:
        return self.inner_step >= self.problem.steps

    def val_batches(self, seed: int, hyper_step: int, sample: int = 0) -> list[Batch]:
        """The validation batch of ``sample`` of hyper-step ``h``: ``val_batch_size`` rows drawn
        from ``(seed, h, sample)`` (:func:`~hyperdiff.seeds.window_sample_seed`) out of
        validation batch ``h mod len(val_data)`` (all batches if None)."""
        batches = self.problem.val_data
        if self.val_batch_size is None:
            return batches
        batch = batches[hyper_step % len(batches)]
        leaves, spec = tree_flatten(batch)
        rows_total = leaves[0].shape[0]
        size = min(self.val_batch_size, rows_total)
        gen = torch.Generator().manual_seed(window_sample_seed(seed, hyper_step, sample))
        rows = torch.randperm(rows_total, generator=gen, device=gen.device)[:size]
        rows = rows.to(leaves[0].device)
        if isinstance(batch, tuple):
            return [tuple(x[rows] for x in batch)]
        return [tree_unflatten([x[rows] for x in leaves], spec)]

    # ------------------------------------------------------------------ one outer step
    def schedule_position(self, loop: Any, step: int) -> tuple[float, int]:
        """Where the outer learning rate's schedule stands, out of the run's windows ``W``:
        the current window (``t // K`` without growth), or with ``schedule_over="steps"`` its
        first inner step ``t`` in window units, ``t W / N`` (the cosine's ``pi t / N``).
        After a failure the same window again; after a restart from step 0, 0."""
        if self.schedule_over == "steps":
            return self.inner_step * self.windows / self.problem.steps, self.windows
        return self.position(self.inner_step), self.windows

    def stop_reason(self, loop: Any) -> str | None:
        return f"one run of {self.inner_step} inner steps" if self.done else None

    def where(self, loop: Any) -> str:
        return f"inner step {self.inner_step}"

    def trainings(self, loop: Any) -> int:
        return 1

    def begin(self, loop: Any, step: int) -> dict[str, Tensor]:
        """The window to train next; the raw values on the problem's device and dtype."""
        if self.done:
            raise HyperdiffError(f"{self.caller}.step: the run of {self.problem.steps} inner "
                                 "steps is finished (got a call after its last window)")
        self.span = (self.inner_step, self.window_stop(self.inner_step))
        self.pending_retry = None
        return self.problem.raw_tensors(loop.raw, check=False)  # checked by evaluate

    def evaluate(self, loop: Any, step: int, raw: dict[str, Tensor]) -> Outcome:
        """Train the window from the current state; its hypergradient, the mean over its
        samples (REINFORCE estimates for the sampled choices' logits), whose spread and
        signal-to-noise ratio the record holds as offline. Values at which an optimizer
        coefficient is invalid fail the window (:class:`CoefficientRangeError`, the guard's)."""
        start, stop = self.span
        check_raw_coefficients(self.problem.optimizer, self.problem.hparams, raw,
                               self.problem.hparam_dtype, params=self.problem.params,
                               steps=range(start, stop))  # the values the window trains at
        group = self._group()
        if group is not None and not self._agreed:
            check_ranks_agree(group, self.caller, [self.problem], raw)
            self._agreed = True
        if self.settled_at is not None:
            return self._plain(loop, raw)
        vals = [self.val_batches(loop.seed, step, j) for j in range(self.samples)]
        outs = self._sampled(loop, step, raw, vals)
        grads = torch.stack([loop.hparams.flatten(self._finite(out.grad, j)).double()
                             for j, out in enumerate(outs)])
        values = torch.tensor([out.value for out in outs], dtype=torch.float64, device="cpu")
        found = combine(grads, values, folds=1, discrete=loop.discrete, step=step, raw=raw,
                        anneal_step=self.position(start))
        warn_low_snr(found, f"{self.caller}: window of steps {start}..{stop - 1}",
                     "validation-batch noise", option("OnlinePlan(samples=...) or a larger "
                     "val_batch_size", "outer.samples or outer.val_batch"))
        fields = {"train_loss": float(outs[0].train_losses.mean()),
                  **estimate_fields(loop.hparams, found)}
        losses = UntrainedLosses([self.problem], raw, vals[0], loop.selection)

        def untrained() -> UntrainedLosses:  # each entry once, where the rescue or guard reads it
            return losses

        check_broken(self, loop.history, fields["val_loss"], fields["grad_norm"], untrained)
        grad = loop.hparams.unflatten(found.mean)
        check_start(self, loop, fields["val_loss"], grad, untrained)
        return Outcome(grad, values.tolist(), fields, untrained, outs[0],
                       self._step_rule(raw, stop))

    def _step_rule(self, raw: dict[str, Tensor], stop: int) -> Any:
        """The outer step's rule for ``lowering < 1``: a move that lowers the learning rate of
        steps ``stop..N-1`` keeps ``lowering`` of its length (None: every move kept). After the
        run's last window no step is left: its move sets the final values, which a fresh
        training runs over all N steps, so the rule reads steps ``0..N-1`` there."""
        if self.lowering == 1.0:
            return None
        direction = lr_direction(self.problem, raw, stop if stop < self.problem.steps else 0)
        if direction is None:
            return None
        return functools.partial(shortened, direction=direction, keep=self.lowering)

    def _plain(self, loop: Any, raw: dict[str, Tensor]) -> Outcome:
        """A window after the values settled: trained plainly at them, no hypergradient
        (``grad=None``: the loop takes no outer step) and no validation loss; its mean train
        loss goes through the guard's absurd-loss rule against the last tuned window's."""
        state, losses = plain_window(self.problem, self.state, raw, *self.span)
        tuned = next((r.train_loss for r in reversed(loop.history)
                      if r.status == "ok" and r.grad is not None), None)
        loop.guard.check_train_loss(float(losses.mean()), tuned)
        return Outcome(None, [], {"train_loss": float(losses.mean())}, dict,
                       Segment(state, {}, math.nan, losses))

    def _sampled(self, loop: Any, step: int, raw: dict[str, Tensor], vals: list[list[Batch]]
                 ) -> list[Segment]:
        """The window's segments, one per sample: one trajectory evaluated at every sample's
        validation batch; with REINFORCE choices, sample ``j`` trains its own draw from the
        same start (sample 0's trajectory is the one the run continues)."""
        start, stop = self.span
        if loop.discrete is None:
            return self.segments(self.problem, raw, start, stop, vals)
        problems = [loop.discrete.prepare(self.problem, step, j, raw,
                                          anneal_step=self.position(start),
                                          noise_seed=window_seed(loop.seed, step))
                    for j in range(self.samples if loop.discrete.reinforce else 1)]
        self.window_hparams = problems[0].hparams  # sample 0's: the trajectory kept
        if len(problems) == 1:
            return self.segments(problems[0], raw, start, stop, vals)
        return [self.segments(p, raw, start, stop, [val])[0]
                for p, val in zip(problems, vals, strict=True)]

    def _finite(self, grad: dict[str, Tensor], sample: int) -> dict[str, Tensor]:
        """``grad`` in float64, refused when not finite (naming the window and the sample)."""
        start, stop = self.span
        which = f" (sample {sample})" if self.samples > 1 else ""
        grad = {n: g.detach().to(torch.float64) for n, g in grad.items()}
        for name, g in grad.items():
            if not torch.isfinite(g).all():
                raise NonFiniteError(f"online {self.label}: the hypergradient of {name!r} is "
                                     f"not finite in the window of steps {start}..{stop - 1}"
                                     f"{which}")
        return grad

    def position(self, start: int) -> int:
        """The index of the window that starts at inner step ``start`` (the annealing step of
        relaxed choices; windows grow with ``growth``, tuner/windows.py)."""
        return window_index(start, self.problem.steps, self.window, self.growth)

    def segments(self, problem: Problem, raw: dict[str, Tensor], start: int, stop: int,
                 vals: list[list[Batch]]) -> list[Segment]:
        """The one place the plan trains: the method's segment ``[start, stop)`` from the
        current state with the carry, at each of ``vals`` (``Method.segment_samples``: one
        trajectory; a data-parallel method wraps here too)."""
        return self.method.segment_samples(problem, self.state, raw, start, stop, vals,
                                           self.tangent)

    def selection_loss(self, loop: Any, outcome: Outcome) -> float | None:
        """The selection loss at the window's end (at the updated values), every
        ``eval_every`` windows and at the last."""
        stop = self.span[1]
        if not loop.selection or not (stop >= self.problem.steps or (
                self.eval_every and (loop.step_index + 1) % self.eval_every == 0)):
            return None
        value = self.selection_at(loop, outcome.kept.state, self.window_hparams)
        group = self._group()
        if group is None:
            return value
        # a data-parallel run's BatchNorm buffers are each rank's: the ranks' mean
        return agreed_mean(group, f"{self.where(loop)}: the selection loss", [value])[0]

    def _group(self) -> Group | None:
        """The process group of a data-parallel method, else ``None``."""
        method = self.method
        return current_group(method.group) if isinstance(method, DataParallelMethod) else None

    def selection_at(self, loop: Any, state: TrainState,
                     hparams: HyperParameters | None = None) -> float:
        """The validation loss on the loop's selection batches at ``state``'s parameters and
        the loop's current values, read through ``hparams`` (default: the specs the state was
        trained with, :meth:`trained_specs`): a discrete choice at its window's temperature,
        Gumbel draw or REINFORCE draw, as the window's validation loss and the offline plan's
        selection loss read it."""
        specs = self.trained_specs(loop) if hparams is None else hparams
        # a read of the model at these values: evaluate checks the coefficients where a
        # window trains at them
        hview = specs.view(self.problem.raw_tensors(loop.raw, check=False))
        probe = replace(self.problem, val_data=loop.selection)
        with torch.no_grad():
            return float(validation_loss(probe, state.params, state.buffers, hview))

    def trained_specs(self, loop: Any) -> HyperParameters:
        """The hyperparameters as the last committed window trained with them (its
        temperatures, Gumbel noise seed and sample 0's REINFORCE draw); after a resume rebuilt
        from that window's record; the loop's own before any window or without discrete
        hyperparameters."""
        if loop.discrete is None:
            return cast(HyperParameters, loop.hparams)
        if self.trained_hparams is not None:
            return self.trained_hparams
        last = next((r for r in reversed(loop.history) if r.status == "ok" and r.discrete),
                    None)
        if last is None:
            return cast(HyperParameters, loop.hparams)
        noise = window_seed(loop.seed, last.step)
        states: dict[str, dict[str, Any]] = {
            n: {"current_temperature": float(t), "noise_seed": noise}
            for n, t in last.discrete.get("temperature", {}).items()}
        for name, drawn in (last.discrete.get("samples") or {}).items():
            labels = [label(c) for c in cast(DiscreteParameter, loop.hparams[name]).choices]
            states[name] = {"sample": labels.index(drawn[0])}
        return with_states(loop.hparams, states)

    def commit(self, loop: Any, outcome: Outcome, record: StepRecord) -> StepRecord:
        """Keep the window's training state and carry; measure the hot start (and restart)."""
        start, stop = self.span
        self.state, self.tangent, self.inner_step = outcome.kept.state, outcome.kept.carry, stop
        self.trained_hparams = self.window_hparams
        if self.settled_at is not None:
            return replace(record, message="plain window at the settled values")
        if measure_hot_start(self, loop, record, start, stop):
            record = replace(record, message=self.warnings[0])
            restart_cooler(self, loop)
        elif reason := self._settles(loop, record, stop):
            self.settled_at, self.tangent = stop, None
            message = (f"tuning settled: {reason}; steps {stop}..{self.problem.steps - 1} "
                       "train plainly at the values after this window")
            _LOG.info("%s: %s", self.caller, message)
            record = replace(record, message="; ".join(m for m in (record.message, message) if m))
        return record

    def _settles(self, loop: Any, record: StepRecord, stop: int) -> str | None:
        """Why the run settles after the tuned window that ends at ``stop`` (``record``), or
        None: never at the run's end nor before the hot-start measure's point."""
        steps = self.problem.steps
        if self.settling.never or stop >= steps or stop < math.ceil(HOT_START_FRACTION * steps):
            return None
        earlier = [r.hparams for r in (*loop.history, record) if r.status == "ok"]
        return self.settling.reason(stop, steps, natural_values(loop.hparams, loop.raw),
                                    earlier)

    def rescue_start(self, loop: Any) -> bool:
        """Whether a failed first window starts over cooler (``rescue``), or warmer or cooler
        (``retry``), instead of ending the run."""
        return self.pending_retry is not None or at_start(self, loop.history)

    def counts_failure(self, loop: Any) -> bool:
        """A failed window counts toward the guard's failures in a row and cuts the outer
        learning rate, except a rescue's or a retry's try (a broken, weak or hot start is not
        a failed outer step)."""
        return self.pending_retry is None and not at_start(self, loop.history)

    def give_up_advice(self, loop: Any, raw: dict[str, Tensor]) -> str:
        """Where the failed window trained at the last good values themselves, what to do
        instead of a smaller outer step (:func:`~hyperdiff.tuner.online_retry.stuck_advice`)."""
        return stuck_advice(self, loop, raw)

    def failure_note(self, loop: Any, message: str) -> str:
        """A try's failed first window: start over cooler (or end the run when the tries are
        spent, :mod:`hyperdiff.tuner.online_rescue`); any other: go on from the last good
        window."""
        start, stop = self.span
        if self.pending_retry is not None or at_start(self, loop.history):
            message = (retry_start(self, loop, message) if self.pending_retry is not None
                       else start_over(self, loop, message))
            _LOG.warning("%s: window of steps %d..%d: %s", self.caller, start, stop - 1, message)
            return message
        message = (f"{message}; training goes on from inner step {start}, the parameters "
                   "and optimizer state before the failed window")
        _LOG.warning("%s: window of steps %d..%d: %s", self.caller, start, stop - 1, message)
        return message

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the run found suspect: a start hotter than the values it found."""
        return hot_start_warnings(self)

    # ------------------------------------------------------------------ guard and checkpoint
    def snapshot(self) -> dict[str, Any]:
        return {}  # a failed window is never committed: the training state stays

    def restore(self, good: dict[str, Any]) -> None:
        return None

    def state_dict(self, loop: Any) -> dict[str, Any]:
        state = tuner_state(self, loop)
        if isinstance(self.method, DataParallelMethod):  # its numbers are of this world size
            state[WORLD_KEY] = torch_world(self._group())
        return state

    def load_state_dict(self, loop: Any, state: dict[str, Any],
                        history: Sequence[StepRecord] | None) -> list[StepRecord]:
        if isinstance(state, dict):
            state = world_checked(self.caller, state, self.method)
        return restore_tuner(self, loop, state, history)

    def result(self, loop: Any) -> OnlineResult:
        return OnlineResult(
            final_raw=loop.raw, final_hparams=loop.hparams.with_raw(loop.raw),
            params=dict(self.state.params), buffers=dict(self.state.buffers),
            history=History(list(loop.history)), steps=self.inner_step,
            hyper_steps=len(loop.history), time_s=loop.elapsed, warnings=self.warnings)


def _betas(caller: str, betas: Any) -> tuple[float, float]:
    """``betas`` as a pair of floats in [0, 1), else the standard error."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise fail(caller, "betas", "None or a pair (beta1, beta2) of numbers in [0, 1)",
                   betas)
    return (number(caller, "betas[0]", betas[0], BETA), number(caller, "betas[1]", betas[1],
                                                                BETA))


def _reinforced(hparams: HyperParameters) -> bool:
    """Whether a discrete hyperparameter of ``hparams`` is sampled by REINFORCE."""
    return any(cast(DiscreteParameter, hparams[n]).mode == "reinforce"
               for n in discrete_names(hparams))


__all__ = ["OnlinePlan", "OnlineResult"]
