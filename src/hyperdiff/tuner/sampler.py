"""The trainings of one outer step: every problem (fold) x ``samples`` minibatch seeds.

Slot ``j * samples + i`` holds problem ``j``'s sample ``i`` at outer step ``s``: it trains T
inner steps with the minibatch seed :meth:`Sampler.seed_for` ``(s, i)``, from theta_0 or (with
warm start) from the slot's last theta_T, with the discrete choices drawn for it
(:mod:`hyperdiff.hparams.discrete`), and gives::

    g_ji = dL_val(theta_T(lam_s))/du  (a HyperGradient)    L_sel,ji = L_sel(theta_T)

The selection loss of the step is ``mean_ji L_sel,ji`` (``None`` without a selection split).
A step evaluated ``plain`` (the global phase's points, whose hypergradients nothing follows)
trains its slots without a graph (:func:`train_plainly`: the same theta_T, bit for bit, at 1x a
plain training instead of the method's 2-4x) and gives their losses only. With
``samples="auto"`` (:class:`~hyperdiff.tuner.snr.AutoSamples`) a step starts with the minimum
and adds one sample of every problem at a time until the signal-to-noise ratio of the per-sample
hypergradients suffices (a plain step: the minimum). The trainings of each round are spread
over the ranks of a process group when there is one (:mod:`hyperdiff.tuner.distributed`).
:meth:`Sampler.estimate` combines the slots into the step's hypergradient ``g_s = mean_ji g_ji``
and its noise (:mod:`hyperdiff.tuner.snr`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import check_finite_losses, train, validation_loss
from hyperdiff.errors import NonFiniteError
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.logs import get_logger
from hyperdiff.methods.base import HyperGradient, Method
from hyperdiff.seeds import minibatch_seed
from hyperdiff.tuner.discrete_outer import DiscreteOuter
from hyperdiff.tuner.distributed.spread import Spreader
from hyperdiff.tuner.history import to_number
from hyperdiff.tuner.snr import (
    SNR_TARGET,
    AutoSamples,
    below,
    more_samples_advice,
    sample_means,
    signal_to_noise,
)
from hyperdiff.typing import Batch, Params


class PlainTraining(NamedTuple):
    """One training without a hypergradient: what a slot of a ``plain`` step gives."""

    value: float  # L_val(theta_T), as HyperGradient.value
    train_loss: float  # the last inner step's training loss
    params: Params  # theta_T (detached)
    buffers: Params


Trained = HyperGradient | PlainTraining
Outcomes = dict[int, tuple[Trained, float | None]]
"""slot -> (its hypergradient or plain training, its selection loss or ``None``)."""
_LOG = get_logger("driver")  # the driver's warnings, under the driver's logger


class Estimate(NamedTuple):
    """One outer step's hypergradient from its ``n`` slots (``k`` flat hyperparameters)."""

    grads: Tensor  # (n, k) float64, each slot's raw hypergradient (REINFORCE-adjusted)
    values: Tensor  # (n,) float64 on the CPU, each slot's validation loss
    mean: Tensor  # (k,) g_s = mean over the slots
    per_sample: Tensor  # (samples, k) each sample's mean over the problems
    snr: float | None  # signal-to-noise ratio of per_sample (None for one sample)
    discrete: dict[str, Any] | None  # the record's entry for discrete hyperparameters


class Sampler:
    """Trains and differentiates the slots of each outer step; keeps their warm starts.

    Args:
        problems: the problems (folds) with the same hyperparameters.
        method: the hypergradient method every slot runs.
        samples: the stride of seeds and slots (the most samples per step).
        auto: :class:`~hyperdiff.tuner.snr.AutoSamples` for ``samples="auto"``, else ``None``.
        seed: base of the minibatch seeds.
        selection: batches of the selection split, or ``None``.
        warm_start: start each slot from its last theta_T.
        discrete: the discrete hyperparameters' hook, or ``None``.
        spreader: maps the trainings of a round over the ranks of a process group.
        batched: hand each rank's trainings of a round to ``method.batch`` at once (the
            tasks of a meta step: one vmapped computation where they are stackable).
        common: every step's slot ``i`` trains on the seed of step 0's (common random
            numbers: the steps' losses differ by their values only).

    ``warm`` holds each slot's last ``(params, buffers)`` (``None`` without warm start) and
    ``trainings`` counts the trainings run (the driver adds each step's :attr:`first_round`
    before the step, :meth:`evaluate` the samples it adds); both are in the driver's checkpoint.
    """

    def __init__(self, problems: tuple[Problem, ...], method: Method, *, samples: int,
                 auto: AutoSamples | None, seed: int, selection: list[Batch] | None,
                 warm_start: bool, discrete: DiscreteOuter | None, spreader: Spreader,
                 batched: bool = False, common: bool = False):
        self.problems, self.method, self.samples, self.auto = problems, method, samples, auto
        self.common = bool(common)
        self.seed, self.selection, self.warm_start = seed, selection, warm_start
        self.discrete, self.spreader = discrete, spreader
        self.batched = batched and discrete is None and not warm_start
        self.warm: list[Any] = [None] * (len(problems) * samples)
        self.trainings = 0

    @property
    def first_round(self) -> int:
        """Trainings a step starts with: every problem x (auto's minimum, or ``samples``)."""
        return len(self.problems) * (self.auto.minimum if self.auto else self.samples)

    def seed_for(self, step: int, sample: int) -> int:
        """Minibatch seed of ``sample`` at outer ``step`` (step 0's with ``common``)."""
        return minibatch_seed(self.seed, 0 if self.common else step, self.samples, sample)

    def evaluate(self, step: int, raw: dict[str, Tensor], plain: bool = False
                 ) -> tuple[list[Trained], float | None]:
        """The hypergradients of step ``step`` at ``raw`` (slots in order; ``plain``: their
        :class:`PlainTraining`, the first round only) and the mean selection loss (``None``
        without a selection split).

        Counts the trainings beyond :attr:`first_round` (the caller counts that one) and
        keeps each slot's theta_T for warm starts.

        Raises:
            NonFiniteError: a training diverged, or the selection loss is not finite.
        """
        done: Outcomes = {}
        count = self.auto.minimum if self.auto else self.samples
        self._sample(step, raw, range(count), done, plain)
        while self.auto and not plain and not self.auto.enough(self._per_sample(done)):
            self._sample(step, raw, range(count, count + 1), done, plain)  # one more, every fold
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

    def estimate(self, step: int, raw: dict[str, Tensor], evaluations: list[Trained]
                 ) -> Estimate:
        """Combine the slots' hypergradients (:func:`combine`); warn when the SNR is below the
        target."""
        hparams = self.problems[0].hparams
        grads = torch.stack([hparams.flatten(_hypergradient(hg).grad).double()
                             for hg in evaluations])
        values = torch.tensor([hg.value for hg in evaluations], dtype=torch.float64, device="cpu")
        found = combine(grads, values, folds=len(self.problems), discrete=self.discrete,
                        step=step, raw=raw)
        warn_low_snr(found, f"outer step {step}", "minibatch noise",
                     more_samples_advice(self.auto is not None, self.samples))
        return found

    def _sample(self, step: int, raw: dict[str, Tensor], samples: range,
                done: Outcomes, plain: bool) -> None:
        """Train and differentiate ``samples`` of every problem (fold-major slots), spread
        over the ranks of the process group when there is one."""
        slots, problems = [], []
        for j, base in enumerate(self.problems):
            for i in samples:
                problem = replace(base, seed=self.seed_for(step, i))
                if self.discrete is not None:  # the noise of (seed, step, sample), also
                    problem = self.discrete.prepare(  # where the minibatches are common
                        problem, step, i, raw,
                        noise_seed=minibatch_seed(self.seed, step, self.samples, i))
                slot = j * self.samples + i
                if self.warm_start and self.warm[slot] is not None:
                    problem = replace(problem, params=self.warm[slot][0],
                                      buffers=self.warm[slot][1])
                slots.append(slot)
                problems.append(problem)
        where = f"outer step {step}"
        outcomes: list[tuple[Trained, float | None]]
        if self.batched and not plain:
            outcomes = self.spreader.map_batch(lambda ps: self._train_batch(ps, raw), problems,
                                               where)
        else:
            outcomes = self.spreader.map(lambda p: self._train(p, raw, plain), problems, where)
        done.update(zip(slots, outcomes, strict=True))

    def _train(self, problem: Problem, raw: dict[str, Tensor], plain: bool
               ) -> tuple[Trained, float | None]:
        hg = train_plainly(problem, raw) if plain else self.method(problem, raw)
        if self.selection is None:
            return hg, None
        return hg, selection_loss(problem, self.selection, hg, raw)

    def _train_batch(self, problems: list[Problem], raw: dict[str, Tensor]
                     ) -> list[tuple[Trained, float | None]]:
        hgs = self.method.batch(problems, raw)
        if self.selection is None:
            return [(hg, None) for hg in hgs]
        return [(hg, selection_loss(p, self.selection, hg, raw))
                for p, hg in zip(problems, hgs, strict=True)]

    def _per_sample(self, done: Outcomes) -> Tensor:
        """``(count, k)``: each sample's hypergradient averaged over the problems (the slots
        in order are fold-major, as :func:`~hyperdiff.tuner.snr.sample_means` takes them)."""
        hparams = self.problems[0].hparams
        grads = [hparams.flatten(_hypergradient(done[slot][0]).grad).double()
                 for slot in sorted(done)]
        return sample_means(torch.stack(grads), len(self.problems))


def _hypergradient(trained: Trained) -> HyperGradient:
    if not isinstance(trained, HyperGradient):
        raise TypeError("a plain training has no hypergradient")  # a plain step adds none
    return trained


def train_plainly(problem: Problem, raw: dict[str, Tensor], *, where: str = "plain training",
                  split: str = "validation") -> PlainTraining:
    """Train ``problem`` for its T steps at ``raw`` without a graph; its loss on its
    ``val_data`` (named ``split`` in messages, which begin with ``where``).

    Raises:
        NonFiniteError: a training loss or the ``split`` loss is not finite.
    """
    state, losses = train(problem, raw)
    check_finite_losses(losses, where)
    hview = problem.hparams.view(problem.raw_tensors(raw))
    with torch.no_grad():
        value = float(validation_loss(problem, state.params, state.buffers, hview))
    if not math.isfinite(value):
        raise NonFiniteError(f"{where}: the {split} loss is not finite ({value})")
    last = float(losses[-1]) if losses.numel() else math.nan
    return PlainTraining(value, last, dict(state.params), dict(state.buffers))


def plain_fields(trainings: list[Trained], folds: int) -> dict[str, Any]:
    """The record's fields of a ``plain`` step (``train_loss`` is the plan's): the mean and
    spread of the validation losses, the samples per fold, and no hypergradient."""
    values = torch.tensor([t.value for t in trainings], dtype=torch.float64, device="cpu")
    return {"val_loss": float(values.mean()),
            "val_loss_std": float(values.std()) if len(values) > 1 else 0.0,
            "grad_norm": None, "grad_std": None, "grad": None, "grad_snr": None,
            "samples": len(trainings) // folds, "discrete": None}


def combine(grads: Tensor, values: Tensor, *, folds: int, discrete: DiscreteOuter | None,
            step: int, raw: dict[str, Tensor], anneal_step: int | None = None) -> Estimate:
    """One step's :class:`Estimate` from its trainings' flat hypergradients ``grads`` ``(n, k)``
    (fold-major rows) and validation losses ``values`` ``(n,)``: REINFORCE estimates for the
    sampled choices' logits (the discrete hook's, at ``anneal_step``), ``g_s = mean_i g_i``,
    the per-sample means over the folds and their signal-to-noise ratio
    (:mod:`hyperdiff.tuner.snr`). Shared by the offline and the online plan."""
    info = None
    if discrete is not None:
        grads, info = discrete.adjust(step, raw, grads, values, anneal_step=anneal_step)
    per_sample = sample_means(grads, folds)
    return Estimate(grads, values, grads.mean(0), per_sample, signal_to_noise(per_sample), info)


def warn_low_snr(found: Estimate, where: str, noise: str, advice: str) -> None:
    """Warn that ``where``'s direction is mostly ``noise`` when its SNR is below the target."""
    if found.snr is not None and found.snr < SNR_TARGET:
        _LOG.warning(
            "%s: the hypergradient's signal-to-noise ratio is %s < %g over %d samples: the "
            "step direction is mostly %s; use more samples (%s)", where,
            below(found.snr, SNR_TARGET), SNR_TARGET, found.per_sample.shape[0], noise, advice)


def estimate_fields(hparams: HyperParameters, found: Estimate) -> dict[str, Any]:
    """The record's fields of an :class:`Estimate` (``train_loss`` is the plan's): the mean
    and spread of the losses and hypergradients, the SNR, the samples, the discrete entry."""
    values, grads, mean = found.values, found.grads, found.mean
    return {
        "val_loss": float(values.mean()),
        "val_loss_std": float(values.std()) if len(values) > 1 else 0.0,
        "grad_norm": float(mean.norm()),
        "grad_std": float(grads.std(0).norm()) if len(grads) > 1 else None,
        "grad": {n: to_number(g) for n, g in hparams.unflatten(mean).items()},
        "grad_snr": found.snr, "samples": found.per_sample.shape[0],
        "discrete": found.discrete,
    }


def selection_loss(problem: Problem, selection: list[Batch], hg: Trained,
                   raw: dict[str, Tensor]) -> float:
    """``problem.val_loss`` on the ``selection`` batches at the trained ``hg.params``."""
    probe = replace(problem, val_data=selection)
    with torch.no_grad():
        hview = problem.hparams.view(problem.raw_tensors(raw))
        return float(validation_loss(probe, hg.params, hg.buffers, hview))
