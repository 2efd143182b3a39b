"""The one contract of every hypergradient method.

A method is configured once (``reverse()``, ``forward()``, ``finite_difference(eps)``, ...) and
then called as ``method(problem, raw=None)``; it returns a :class:`HyperGradient`.

A method that can take a hypergradient over a *segment* of training also offers
``method.segment(problem, state, raw, start, stop, val_batches, carry) -> Segment``: train
steps ``start .. stop-1`` from ``state`` (the parameters, buffers and optimizer state at
``start``), and return the state at ``stop``, ``dL_val/du`` at the validation batches, the
validation loss and the *carry*: what the method hands to its next segment (forward mode's
tangents ``Z_t = ds_t/du``, curvature's tangents and statistics; ``None`` for the others and
at the start of a run). Offline is the segment ``[0, T)`` from ``theta_0``; an online window
is ``[t, t+K)`` from the current state with the carry. Several problems that differ only in
their data (the tasks of a meta step) are differentiated by ``method.batch(problems, raw)``:
one batched computation where the method offers one and the tasks are stackable
(:mod:`hyperdiff.engine.task_batch`), one call per problem otherwise. What a method can do
is declared in its :class:`Capabilities`, which the tuners and configs read instead of lists
of names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.task_batch import TaskBatch, stack_tasks
from hyperdiff.engine.training import TrainState, zeros_for_unused
from hyperdiff.errors import HyperdiffError, NonFiniteError
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.logs import get_logger
from hyperdiff.typing import Batch, Params
from hyperdiff.wording import option


@dataclass(frozen=True)
class HyperGradient:
    """Validation loss and its hypergradient at one hyperparameter value.

    Attributes:
        value: validation loss ``L_val(theta_T(lam), lam)``.
        grad: ``dL_val/du`` for the raw (unconstrained) values ``u``, shaped like them.
        grad_natural: ``dL_val/dlam`` in natural units, shaped like the hyperparameters.
        method: name of the method that produced it.
        hparams: the hyperparameters (with the raw values used).
        train_loss: training loss at the last inner step.
        params, buffers: the trained parameters theta_T and buffers (detached).
        diagnostics: method-specific facts (time, iterations, residuals, ...).
    """

    value: float
    grad: dict[str, Tensor]
    grad_natural: dict[str, Tensor]
    method: str
    hparams: HyperParameters
    train_loss: float
    params: Params = field(repr=False)
    buffers: Params = field(repr=False)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def vector(self) -> Tensor:
        """The raw hypergradient as one flat vector (order of ``hparams``)."""
        return self.hparams.flatten(self.grad)

    @property
    def natural_vector(self) -> Tensor:
        return self.hparams.flatten(self.grad_natural)

    def __repr__(self) -> str:
        parts = []
        for name, g in self.grad_natural.items():
            if g.numel() == 1:
                parts.append(f"{name}={float(g):.6g}")
            else:
                parts.append(f"{name}=<{tuple(g.shape)} norm {float(g.norm()):.4g}>")
        return (
            f"HyperGradient(method={self.method!r}, value={self.value:.6g}, "
            f"grad_natural=({', '.join(parts)}))"
        )


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, declared once on the method (read by the tuners and configs).

    Attributes:
        exact: the hypergradient is exact for the problem (not truncated or approximated).
        offline: ``method(problem, raw)`` over the whole run ``[0, T)``.
        online: ``method.segment(...)`` over a segment of training (online windows).
        carries_state: its segments hand a carry to the next one (tangents).
        data_parallel: takes its train-loss gradients by autograd at the parameters
            (``train_step``, ``train_gradient``), so ``hd.distributed.data_parallel`` can shard
            its inner training (offline call and segment).
        long_horizon: its carry estimates the effect of the whole run's past, over a
            forgetting horizon (``curvature``), so an online run restarts a start hotter than
            the values it found by default (``OnlinePlan(hot_start=None)``).
        segment_options: the constructor's options that its segment reads; an online run
            configured with any other option is refused (it would be ignored).
    """

    exact: bool = True
    offline: bool = True
    online: bool = False
    carries_state: bool = False
    data_parallel: bool = False
    long_horizon: bool = False
    segment_options: tuple[str, ...] = ()


class Segment(NamedTuple):
    """One segment ``[start, stop)`` of training: the state at ``stop`` (detached), the raw
    hypergradient ``dL/du``, the validation loss, the segment's train losses ``(stop-start,)``,
    the carry for the next segment, diagnostics."""

    state: TrainState
    grad: dict[str, Tensor]
    value: float
    train_losses: Tensor
    carry: Any = None
    diagnostics: dict[str, Any] | None = None


SegmentFn = Callable[[Problem, TrainState, dict[str, Tensor], int, int, list[Batch], Any], Segment]
"""``segment(problem, state, raw, start, stop, val_batches, carry) -> Segment``."""

SamplesFn = Callable[[Problem, TrainState, dict[str, Tensor], int, int, list[list[Batch]], Any],
                     list[Segment]]
"""``samples(problem, state, raw, start, stop, val_sets, carry) -> [Segment per set]``: one
trajectory, the validation side once per set of validation batches."""


BatchFn = Callable[[TaskBatch, dict[str, Tensor]], list["HyperGradient"]]
"""``batch(tasks, raw) -> [HyperGradient per task]`` over stacked tasks."""

OFFLINE_MODE = 'outer.mode = "offline"'
_LOG = get_logger("methods")


@dataclass(frozen=True)
class Method:
    """A configured hypergradient method: ``method(problem, raw=None) -> HyperGradient`` and,
    where ``capabilities.online``, ``method.segment(...) -> Segment`` (module doc)."""

    name: str
    run: Callable[[Problem, dict[str, Tensor]], HyperGradient] = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict)
    capabilities: Capabilities = Capabilities()
    segment_fn: SegmentFn | None = field(default=None, repr=False, compare=False)
    carry_fn: Callable[[Problem, dict[str, Tensor], TrainState], Any] | None = field(
        default=None, repr=False, compare=False)
    check_fn: Callable[[Problem], None] | None = field(default=None, repr=False, compare=False)
    samples_fn: SamplesFn | None = field(default=None, repr=False, compare=False)
    batch_fn: BatchFn | None = field(default=None, repr=False, compare=False)
    saved_carry_fn: Callable[[Problem, Any], Any] | None = field(default=None, repr=False,
                                                                 compare=False)

    @property
    def exact(self) -> bool:
        return self.capabilities.exact

    def __call__(self, problem: Problem, raw: dict[str, Tensor] | None = None) -> HyperGradient:
        return self.run(problem, problem.raw_tensors(raw))

    def batch(self, problems: Sequence[Problem], raw: dict[str, Tensor] | None = None
              ) -> list[HyperGradient]:
        """``[method(p, raw) for p in problems]`` for problems that differ only in their data:
        one batched computation when the method has one and the problems are stackable
        (:func:`~hyperdiff.engine.task_batch.stack_tasks`), else one call per problem, also
        when vmap refuses the losses (data-dependent Python control flow, ``.item()``)."""
        tasks = None if self.batch_fn is None else stack_tasks(problems)
        if tasks is not None:
            try:
                return self.batch_fn(tasks, tasks.template.raw_tensors(raw))  # type: ignore[misc]
            except RuntimeError as err:  # vmap's refusal; the loop raises a real error again
                _LOG.debug("%s: batched tasks fell back to one by one: %s", self.name, err)
        return [self(p, raw) for p in problems]

    def segment(self, problem: Problem, state: TrainState, raw: dict[str, Tensor], start: int,
                stop: int, val_batches: list[Batch], carry: Any = None) -> Segment:
        """The hypergradient over steps ``[start, stop)`` from ``state`` (module doc); the
        ``carry`` given is not modified."""
        self._check_segment(problem)
        assert self.segment_fn is not None  # _check_segment refused it otherwise
        return self.segment_fn(problem, state, raw, start, stop, val_batches, carry)

    def segment_samples(self, problem: Problem, state: TrainState, raw: dict[str, Tensor],
                        start: int, stop: int, val_sets: list[list[Batch]], carry: Any = None
                        ) -> list[Segment]:
        """The segment ``[start, stop)`` evaluated at each of ``val_sets`` (lists of validation
        batches): one :class:`Segment` per set, all of the same trajectory (state, train
        losses, carry), each with its own hypergradient and validation loss. A method with a
        ``samples_fn`` trains the segment once and repeats only the validation side; the
        others train it once per set (the same arithmetic each time)."""
        if self.samples_fn is None or len(val_sets) == 1:
            return [self.segment(problem, state, raw, start, stop, val, carry)
                    for val in val_sets]
        self._check_segment(problem)
        return self.samples_fn(problem, state, raw, start, stop, val_sets, carry)

    def _check_segment(self, problem: Problem) -> None:
        if self.segment_fn is None:
            raise HyperdiffError(f"{self.name}: method must support segments of training "
                                 f"(capabilities.online) to be used online (got {self!r})")
        if problem.initialization is not None:
            raise HyperdiffError(
                f"{self.name}: an online segment must train a problem without an "
                f"initialization hyperparameter (got {problem.initialization!r}); theta_0 is "
                "used at step 0 only, so windows later in the run cannot move it: tune it "
                f"offline ({option('HyperOptimizer', OFFLINE_MODE)})")

    def check(self, problem: Problem) -> None:
        """Refuse a ``problem`` the method cannot handle (raises :class:`HyperdiffError`)."""
        if self.check_fn is not None:
            self.check_fn(problem)

    def carry_like(self, problem: Problem, raw: dict[str, Tensor], state: TrainState) -> Any:
        """A carry of the right structure, shapes and dtypes (for checking and restoring a
        saved one); ``None`` for a method that carries nothing."""
        return None if self.carry_fn is None else self.carry_fn(problem, raw, state)

    def saved_carry(self, problem: Problem, saved: Any) -> Any:
        """A carry read from a checkpoint in the layout :meth:`carry_like` gives today (a
        method whose carry's layout changed converts older checkpoints; unchanged otherwise)."""
        return saved if self.saved_carry_fn is None else self.saved_carry_fn(problem, saved)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}({opts})"


def finish(
    problem: Problem,
    raw: dict[str, Tensor],
    *,
    method: str,
    value: Tensor,
    grad: dict[str, Tensor],
    params: Params,
    buffers: Params,
    train_losses: Tensor,
    started: float,
    computed: list[int] | None = None,
    **diagnostics: Any,
) -> HyperGradient:
    """Check finiteness and package a :class:`HyperGradient`.

    ``computed`` lists the flat coordinates a partial method filled in; the others are NaN by
    design and are not checked.
    """
    value_f = float(value.detach())
    if not torch.isfinite(value.detach()):
        raise NonFiniteError(f"{method}: the validation loss is not finite ({value_f})")
    grad = {n: g.detach() for n, g in grad.items()}
    checked = grad
    if computed is not None:
        flat = problem.hparams.flatten(grad)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[computed] = True
        checked = problem.hparams.unflatten(torch.where(mask, flat, 0.0))
    for name, g in checked.items():
        if not torch.isfinite(g).all():
            raise NonFiniteError(
                f"{method}: the hypergradient of {name!r} is not finite "
                f"({int((~torch.isfinite(g)).sum())} of {g.numel()} entries) after "
                f"{problem.steps} inner steps; lower the learning rate, the number of steps, "
                "or check the losses for NaN-producing operations"
            )
    hp = problem.hparams.with_raw(raw)
    diagnostics.setdefault("time_s", time.perf_counter() - started)
    diagnostics.setdefault("steps", problem.steps)
    return HyperGradient(
        value=value_f,
        grad=grad,
        grad_natural=hp.natural_grad(grad, {n: v.detach() for n, v in raw.items()}),
        method=method,
        hparams=hp,
        train_loss=float(train_losses[-1]) if train_losses.numel() else float("nan"),
        params={k: v.detach() for k, v in params.items()},
        buffers={k: v.detach() for k, v in buffers.items()},
        diagnostics=diagnostics,
    )


__all__ = ["BatchFn", "Capabilities", "HyperGradient", "Method", "SamplesFn", "Segment",
           "SegmentFn", "finish", "zeros_for_unused"]
