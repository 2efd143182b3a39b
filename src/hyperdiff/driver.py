"""The outer loop as a library object: :class:`HyperOptimizer`.

At outer step ``s`` with raw hyperparameters ``u_s`` (natural values ``lam_s = f(u_s)``)::

    for each problem j (one, or one per cross-validation fold) and sample i < samples:
        train T inner steps from theta_0 (or, with warm_start, from that slot's last theta)
        with minibatch seed seed(s, i): theta_T(lam_s); L_ji = L_val(theta_T), g_ji = dL_ji/du
    g_s = mean_ji g_ji   (spread: std_ji g_ji)
    u_{s+1} = torch.optim step on g_s (Adam by default; optional clipping and cosine decay)

The loop keeps the ``lam_s`` with the lowest *selection* loss, computed on a split the
hypergradient never sees (the validation loss when there is no selection split), stops on a
budget, on early stopping or on convergence, and survives divergence (see
:mod:`hyperdiff.guard`). It is shaped like an Optuna study: :meth:`HyperOptimizer.step` runs one
outer step and returns its immutable :class:`~hyperdiff.history.StepRecord`;
:meth:`HyperOptimizer.run` loops until a stopping rule fires. :meth:`state_dict` holds all that a
checkpoint needs to resume the run exactly.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .data import FullBatch
from .datacheck import check_batch, shapes_of
from .discrete.outer import outer_hook
from .distributed.spread import spreader_for
from .errors import (
    HyperdiffError,
    NonFiniteError,
    fail,
    nonnegative_int,
    positive_float,
    positive_int,
)
from .guard import DivergenceGuard
from .history import (
    History,
    OptimizeResult,
    StepRecord,
    finite_or_none,
    natural_values,
    to_number,
)
from .logs import get_logger
from .methods.base import HyperGradient, Method
from .problem import Problem
from .registry import METHODS, OPTIMIZERS, SCHEDULES, make_method
from .snr import SNR_TARGET, AutoSamples, sample_means, signal_to_noise
from .stopping import Stopping, ranking_loss, ranking_name, tied
from .training import validation_loss
from .typing import Batch

Callback = Callable[["HyperOptimizer", StepRecord], None]
_LOG = get_logger("driver")


class HyperOptimizer:
    """Hypergradient descent on the hyperparameters of one or more inner problems.

    Args:
        problem: a :class:`~hyperdiff.problem.Problem`, or a sequence of problems with the same
            hyperparameters (cross-validation folds) whose validation losses are averaged.
        method: a :class:`~hyperdiff.methods.base.Method` or a name in :data:`METHODS`.
        optimizer: outer optimizer, a name in :data:`OPTIMIZERS` (default Adam).
        lr: outer learning rate (raw units: 0.05 moves a log-constrained value by ~5%).
        clip: clip the raw hypergradient to this L2 norm (``None``: no clipping).
        schedule: ``"cosine"`` (decay to 0 over ``stopping.max_steps``, the default, as in
            ``hyperdiff run``) or ``"constant"``.
        samples: trainings per step with different minibatch seeds; their hypergradients are
            averaged (variance reduction), their spread and signal-to-noise ratio are recorded
            (:mod:`hyperdiff.snr`), and a ratio below 1 is logged as a warning. ``"auto"``:
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
        shrink, max_failures, max_loss_ratio: the divergence guard (:mod:`hyperdiff.guard`):
            a step fails when training diverges, a loss exceeds ``max_loss_ratio`` x
            max(|initial loss|, 1), or a value leaves its constraint.
        process_group: spread the trainings of each step over the ranks of this
            ``torch.distributed`` group (``None``: the initialised default group, if any; see
            :mod:`hyperdiff.distributed`). Every rank then holds the single-process result.

    >>> import torch, hyperdiff as hd
    >>> from hyperdiff.driver import HyperOptimizer, Stopping
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
        optimizer: str = "adam",
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
        self.problems = _check_problems(problem)
        self.hparams = self.problems[0].hparams
        self.method = make_method(method) if isinstance(method, str) else method
        if not isinstance(self.method, Method):
            raise fail("HyperOptimizer", "method", f"a Method or one of {sorted(METHODS)}",
                       self.method)
        if optimizer not in OPTIMIZERS:
            raise fail("HyperOptimizer", "optimizer", f"one of {sorted(OPTIMIZERS)}", optimizer)
        if schedule not in SCHEDULES:
            raise fail("HyperOptimizer", "schedule", f"one of {list(SCHEDULES)}", schedule)
        self.lr = positive_float("HyperOptimizer", "lr", lr)
        self.clip = None if clip is None else positive_float("HyperOptimizer", "clip", clip)
        self.schedule = schedule
        self.auto = _auto_samples(samples, max_samples)
        self.samples = self.auto.maximum if self.auto else positive_int(
            "HyperOptimizer", "samples", samples)  # the stride of seeds and warm slots
        self.tie_steps = nonnegative_int("HyperOptimizer", "tie_steps", tie_steps)
        self.warm_start = bool(warm_start)
        self.selection = _as_batches(selection)
        _check_selection(self.problems[0], self.selection)
        if self.auto is None and self.samples == 1 and not all(
                isinstance(p.train_data, FullBatch) for p in self.problems):
            _LOG.info("HyperOptimizer: samples=1 with minibatches: the hypergradient's noise is "
                      "not measured; samples='auto' measures its signal-to-noise ratio and "
                      "draws enough samples")
        self.seed = nonnegative_int("HyperOptimizer", "seed", seed)
        self.stopping = stopping or Stopping()
        self.guard = DivergenceGuard(shrink=shrink, max_failures=max_failures,
                                     max_loss_ratio=max_loss_ratio)
        self.leaves = {n: v.clone().requires_grad_() for n, v in self.hparams.raw.items()}
        optim_class = getattr(torch.optim, OPTIMIZERS[optimizer])
        self.optimizer = optim_class(list(self.leaves.values()), lr=self.lr)
        self.history = History()
        self.step_index = 0
        self.trainings = 0
        self.best: dict[str, Any] | None = None
        self.since_best = 0
        self.stopped: str | None = None
        self.warm: list[Any] = [None] * (len(self.problems) * self.samples)
        self.discrete = outer_hook(self.hparams, seed=self.seed, samples=self.samples,
                                   max_steps=self.stopping.max_steps, folds=len(self.problems))
        self._elapsed = 0.0
        self._clock: float | None = None
        self.spreader = spreader_for(self.method, process_group)

    # ------------------------------------------------------------------ public loop
    @property
    def raw(self) -> dict[str, Tensor]:
        """Current raw values (detached copies)."""
        return {n: v.detach().clone() for n, v in self.leaves.items()}

    @property
    def elapsed(self) -> float:
        """Wall time spent in steps of this run, across resumes."""
        return self._elapsed if self._clock is None else time.perf_counter() - self._clock

    def stop_reason(self) -> str | None:
        """Why the loop should stop now, or ``None`` to go on."""
        rules = self.stopping
        if self.stopped:
            return self.stopped
        if self.step_index >= rules.max_steps:
            return f"budget: {rules.max_steps} outer steps"
        if rules.max_time_s is not None and self.elapsed >= rules.max_time_s:
            return f"time: {rules.max_time_s:g} s"
        if rules.patience and self.since_best >= rules.patience:
            which = "selection" if self.selection else "validation"
            return f"early stopping: no better {which} loss for {rules.patience} steps"
        return None

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
            NonFiniteError: when the divergence guard gives up (see :mod:`hyperdiff.guard`).
        """
        if self._clock is None:
            self._clock = time.perf_counter() - self._elapsed
        started = time.perf_counter()
        step, raw = self.step_index, self.raw
        snapshot = {"raw": raw, "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                    "warm": list(self.warm)}
        lr = self.learning_rate(step)
        self.trainings += len(self.problems) * (self.auto.minimum if self.auto else self.samples)
        try:
            self.guard.check_values(self.hparams, raw)
            evaluations, selection = self._evaluate(step, raw)
            self.guard.check_losses([hg.value for hg in evaluations], selection)
        except NonFiniteError as err:
            return self._failed(step, raw, lr, str(err), started)
        self.guard.succeeded(snapshot)
        grads = torch.stack([self.hparams.flatten(hg.grad).double() for hg in evaluations])
        values = torch.tensor([hg.value for hg in evaluations], dtype=torch.float64, device="cpu")
        discrete = None
        if self.discrete is not None:  # REINFORCE estimates for the sampled choices' logits
            grads, discrete = self.discrete.adjust(step, raw, grads, values)
        mean = grads.mean(0)
        per_sample = sample_means(grads, len(self.problems))
        snr = signal_to_noise(per_sample)
        if snr is not None and snr < SNR_TARGET:
            _LOG.warning(
                "outer step %d: the hypergradient's signal-to-noise ratio is %.2g < %g over "
                "%d samples: the step direction is mostly minibatch noise; use more samples "
                "(samples=%s)", step, snr, SNR_TARGET, per_sample.shape[0],
                "'auto'" if self.auto is None else f"'auto' with max_samples > {self.samples}")
        self._update(tied(self.hparams.unflatten(mean)) if step < self.tie_steps
                     else self.hparams.unflatten(mean), lr)
        val = float(values.mean())
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
        if len(history) != state["step"]:
            raise HyperdiffError(
                f"HyperOptimizer: history must hold {state['step']} records to resume "
                f"(got {len(history)})"
            )
        if len(state["warm"]) != len(self.warm):
            raise HyperdiffError(
                "HyperOptimizer: the checkpoint must come from a run with the same folds and "
                f"samples ({len(self.warm)} trainings per step; got {len(state['warm'])})"
            )
        with torch.no_grad():
            for name, leaf in self.leaves.items():
                leaf.copy_(state["raw"][name])
        if missing := _missing_optimizer_entries(self.optimizer, state["optimizer"]):
            raise HyperdiffError(f"HyperOptimizer: the outer optimizer state lacks the entries "
                                 f"{missing} that {type(self.optimizer).__name__} needs")
        self.optimizer.load_state_dict(state["optimizer"])
        self.guard.load_state_dict(state["guard"])
        self.best, self.since_best = state["best"], int(state["since_best"])
        self.warm, self.trainings = list(state["warm"]), int(state["trainings"])
        self.step_index, self.stopped = int(state["step"]), state["stopped"]
        self._elapsed, self._clock = float(state["elapsed"]), None
        self.history = History(list(history))
        torch.set_rng_state(state["rng"])
        if self.discrete is not None:
            self.discrete.load_state_dict(state["discrete"])

    # ------------------------------------------------------------------ internals
    def seed_for(self, step: int, sample: int) -> int:
        """Minibatch seed of ``sample`` at outer ``step``."""
        return (self.seed * 1_000_003 + step * self.samples + sample) % (2**31)

    def _evaluate(self, step: int, raw: dict[str, Tensor]
                  ) -> tuple[list[HyperGradient], float | None]:
        done: dict[int, tuple[HyperGradient, float | None]] = {}  # slot -> (hg, selection)
        count = self.auto.minimum if self.auto else self.samples
        self._sample(step, raw, range(count), done)
        while self.auto and not self.auto.enough(self._per_sample(done)):
            self._sample(step, raw, range(count, count + 1), done)  # one more, every fold
            self.trainings += len(self.problems)
            count += 1
        evaluations = [done[slot][0] for slot in sorted(done)]
        selection = [v for slot in sorted(done) if (v := done[slot][1]) is not None]
        for slot, (hg, _) in done.items():
            self.warm[slot] = (hg.params, hg.buffers) if self.warm_start else None
        if not selection:
            return evaluations, None
        value = sum(selection) / len(selection)
        if not math.isfinite(value):
            raise NonFiniteError(f"the selection loss is not finite ({value})")
        return evaluations, value

    def _sample(self, step: int, raw: dict[str, Tensor], samples: range,
                done: dict[int, tuple[HyperGradient, float | None]]) -> None:
        """Train and differentiate ``samples`` of every problem (fold-major slots), spread
        over the ranks of the process group when there is one."""
        slots, problems = [], []
        for j, base in enumerate(self.problems):
            for i in samples:
                problem = replace(base, seed=self.seed_for(step, i))
                if self.discrete is not None:
                    problem = self.discrete.prepare(problem, step, i, raw)
                slot = j * self.samples + i
                if self.warm_start and self.warm[slot] is not None:
                    problem = replace(problem, params=self.warm[slot][0],
                                      buffers=self.warm[slot][1])
                slots.append(slot)
                problems.append(problem)
        outcomes = self.spreader.map(lambda p: self._train(p, raw), problems,
                                     f"outer step {step}")
        done.update(zip(slots, outcomes, strict=True))

    def _train(self, problem: Problem, raw: dict[str, Tensor]
               ) -> tuple[HyperGradient, float | None]:
        hg = self.method(problem, raw)
        if self.selection is None:
            return hg, None
        return hg, self._selection_loss(problem, self.selection, hg, raw)

    def _per_sample(self, done: dict[int, tuple[HyperGradient, float | None]]) -> Tensor:
        """``(count, k)``: each sample's hypergradient averaged over the problems (the slots
        in order are fold-major, as :func:`~hyperdiff.snr.sample_means` takes them)."""
        grads = [self.hparams.flatten(done[slot][0].grad).double() for slot in sorted(done)]
        return sample_means(torch.stack(grads), len(self.problems))

    @staticmethod
    def _selection_loss(problem: Problem, selection: list[Batch], hg: HyperGradient,
                        raw: dict[str, Tensor]) -> float:
        probe = replace(problem, val_data=selection)
        with torch.no_grad():
            hview = problem.hparams.view(problem.raw_tensors(raw))
            return float(validation_loss(probe, hg.params, hg.buffers, hview))

    def _update(self, grad: dict[str, Tensor], lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for name, leaf in self.leaves.items():
            leaf.grad = grad[name].detach().to(device=leaf.device, dtype=leaf.dtype, copy=True)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.leaves.values()), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

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
        self.warm = list(good["warm"])
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


def _check_problems(problem: Problem | Sequence[Problem]) -> tuple[Problem, ...]:
    problems = (problem,) if isinstance(problem, Problem) else tuple(problem)
    if not problems or not all(isinstance(p, Problem) for p in problems):
        raise fail("HyperOptimizer", "problem",
                   "a Problem or a non-empty sequence of Problems (made by hd.make_problem)",
                   problem)
    names = list(problems[0].hparams)
    for p in problems[1:]:
        if list(p.hparams) != names:
            raise fail("HyperOptimizer", "problems", f"all tuning the hyperparameters {names}",
                       list(p.hparams))
    return problems


def _as_batches(selection: Batch | list[Batch] | None) -> list[Batch] | None:
    if selection is None:
        return None
    batches = list(selection) if isinstance(selection, list) else [selection]
    if not batches:
        raise fail("HyperOptimizer", "selection", "a batch or a non-empty list of batches "
                   "(None: no selection split)", selection)
    return batches


def _auto_samples(samples: int | str, max_samples: int) -> AutoSamples | None:
    """``AutoSamples`` for ``samples="auto"``, ``None`` for a fixed count."""
    if isinstance(samples, str):
        if samples != "auto":
            raise fail("HyperOptimizer", "samples", "a positive int or 'auto'", samples)
        return AutoSamples(maximum=max_samples)  # which checks it
    positive_int("HyperOptimizer", "max_samples", max_samples)
    return None


def _check_selection(problem: Problem, selection: list[Batch] | None) -> None:
    """Evaluate ``val_loss`` once on the selection batches at theta_0: a batch it cannot take
    fails here with the shapes, not after the first training; warn when there is none."""
    if selection is None:
        _LOG.warning(
            "HyperOptimizer: no selection split: the best step and early stopping use the "
            "validation loss that the hypergradient descends, which many hyperparameters can "
            "overfit; pass selection=batches held out from val_data (hyperdiff run: "
            "task.selection_fraction > 0)")
        return
    for batch in selection:
        check_batch("HyperOptimizer", "selection", batch)
    hview = problem.hparams.view(problem.raw_tensors())
    try:
        with torch.no_grad():
            value = float(validation_loss(replace(problem, val_data=selection), problem.params,
                                          problem.buffers, hview))
    except HyperdiffError:
        raise
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as err:
        raise HyperdiffError(
            "HyperOptimizer: selection must be batches that val_loss accepts, like val_data "
            f"(selection batch: {shapes_of(selection[0])}; validation batch: "
            f"{shapes_of(problem.val_data[0])}; parameter shapes "
            f"{ {n: tuple(p.shape) for n, p in problem.params.items()} }): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not math.isfinite(value):
        raise fail("HyperOptimizer", "selection loss at the initial parameters",
                   "finite", value)


def _missing_optimizer_entries(optimizer: torch.optim.Optimizer, state: dict[str, Any]
                               ) -> list[str]:
    """Per-parameter entries (``exp_avg``, ``square_avg``, ...) that ``optimizer.step`` needs
    and a non-empty saved parameter state lacks, found by one step of a probe optimizer."""
    params = [p.detach().clone().requires_grad_() for g in optimizer.param_groups
              for p in g["params"]]
    probe = type(optimizer)(params, **optimizer.defaults)
    for p in params:
        p.grad = torch.zeros_like(p)
    probe.step()
    needed = set().union(*(probe.state[p].keys() for p in params))
    saved = [set(entry) for entry in state.get("state", {}).values() if entry]
    return sorted(set().union(*(needed - entry for entry in saved)))
