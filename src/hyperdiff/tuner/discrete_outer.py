"""The outer loop's hook for discrete hyperparameters (used by both plans of
:class:`~hyperdiff.tuner.driver.HyperOptimizer`).

Per training (outer step ``s``, sample ``i``; every cross-validation fold shares sample ``i``;
online one sample per window, annealed over the run's windows):

- relax / gumbel: the temperature of step ``s`` (geometric schedule over the outer budget),
  the Gumbel noise seeded by the training's seed;
- reinforce: a plain choice ``z_i ~ softmax(u)`` drawn from a seed fixed by
  ``(seed, s, i, name)``, so a resumed run draws the same samples.

After the trainings the logits of the REINFORCE hyperparameters get the score-function
estimate (:mod:`hyperdiff.tuner.reinforce`) in place of the method's hypergradient (which is
zero: a plain choice does not depend on the logits); the continuous hyperparameters keep their
exact hypergradients from the same trainings. The step's record gets the samples, the
baseline, the temperature and the estimate's variance. The moving-average baseline takes a
step's losses only once the divergence guard has passed the step (:meth:`DiscreteOuter.commit`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.errors import HyperdiffError
from hyperdiff.hparams.discrete import DiscreteParameter, discrete_names, label, with_states
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.seeds import choice_seed
from hyperdiff.tuner import reinforce
from hyperdiff.wording import option


class DiscreteOuter:
    """Per-training states and REINFORCE estimates for the discrete hyperparameters."""

    def __init__(self, hparams: HyperParameters, *, seed: int, max_steps: int, samples: int,
                 folds: int, baseline: str | None = None):
        self.hparams = hparams
        self.baseline = baseline  # replaces the specs' baseline when given
        self.names = discrete_names(hparams)
        self.reinforce = [n for n in self.names if self.spec(n).mode == "reinforce"]
        self.seed, self.max_steps, self.samples, self.folds = seed, max_steps, samples, folds
        self.moving_average: float | None = None
        self.pending_average: float | None = None  # the step's, until the guard passes it
        self.drawn: dict[int, dict[str, int]] = {}

    def spec(self, name: str) -> DiscreteParameter:
        return cast(DiscreteParameter, self.hparams[name])

    def sample_seed(self, step: int, sample: int, name: str) -> int:
        return choice_seed(self.seed, step, sample, name)

    def prepare(self, problem: Problem, step: int, sample: int, raw: dict[str, Tensor],
                anneal_step: int | None = None, noise_seed: int | None = None) -> Problem:
        """``problem`` with the discrete specs set for this training: draws seeded by
        ``(step, sample)``, the temperature of ``anneal_step`` (default ``step``) of
        ``max_steps``, the Gumbel noise seeded by ``noise_seed`` (default ``problem.seed``)."""
        at = step if anneal_step is None else anneal_step
        states: dict[str, dict[str, Any]] = {}
        drawn = self.drawn.setdefault(sample, {})
        for name in self.names:
            spec = self.spec(name)
            if spec.mode == "reinforce":
                probs = torch.softmax(raw[name].detach().double(), dim=-1)
                drawn[name] = reinforce.draw(probs, self.sample_seed(step, sample, name))
                states[name] = {"sample": drawn[name]}
            else:
                states[name] = {"current_temperature": spec.temperature_at(at, self.max_steps),
                                "noise_seed": problem.seed if noise_seed is None
                                else noise_seed}
        return replace(problem, hparams=with_states(problem.hparams, states))

    def adjust(self, step: int, raw: dict[str, Tensor], grads: Tensor, values: Tensor,
               anneal_step: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Put the score-function estimates into ``grads`` (rows: trainings in the driver's
        order fold * samples + sample; columns: flat hyperparameters). Returns the new rows
        and the record's ``discrete`` entry."""
        info: dict[str, Any] = {"temperature": {
            n: self.spec(n).temperature_at(step if anneal_step is None else anneal_step,
                                           self.max_steps)
            for n in self.names if n not in self.reinforce}}
        if not self.reinforce:
            self.drawn = {}
            return grads, info
        losses = values.double().reshape(self.folds, self.samples).mean(0)  # (S,)
        kind = self.baseline or self.spec(self.reinforce[0]).baseline
        base = reinforce.baselines(losses, kind, self.moving_average)
        advantage = reinforce.advantages(losses, kind, self.moving_average)  # L_i - b_i
        rows = [self.hparams.unflatten(row.clone()) for row in grads]
        variance = 0.0
        for name in self.reinforce:
            probs = torch.softmax(raw[name].detach().double(), dim=-1)
            scores = torch.stack([reinforce.score(self.drawn[i][name], probs)
                                  for i in range(self.samples)])
            per_sample = advantage.unsqueeze(-1) * scores  # (S, n): reinforce.estimates
            if self.samples > 1:
                variance += float(per_sample.var(0).sum())
            if kind == "leave_one_out":  # exact zeros where the estimate is identically 0
                per_sample = reinforce.leave_one_out_terms(
                    per_sample, [self.drawn[i][name] for i in range(self.samples)])
            for slot, row in enumerate(rows):
                row[name] = per_sample[slot % self.samples].to(row[name].dtype)
        decay = self.spec(self.reinforce[0]).decay
        mean = float(losses.mean())
        self.pending_average = mean if self.moving_average is None else (
            decay * self.moving_average + (1 - decay) * mean)
        info.update({
            "samples": {n: [label(self.spec(n).choices[self.drawn[i][n]])
                            for i in range(self.samples)] for n in self.reinforce},
            "baseline": base.tolist(),
            "estimate_variance": variance if self.samples > 1 else None,
        })
        self.drawn = {}
        return torch.stack([self.hparams.flatten(r) for r in rows]), info

    def commit(self) -> None:
        """The step passed the divergence guard: its losses join the moving average."""
        if self.pending_average is not None:
            self.moving_average, self.pending_average = self.pending_average, None

    def state_dict(self) -> dict[str, Any]:
        return {"moving_average": self.moving_average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moving_average, self.pending_average = state["moving_average"], None


def outer_hook(hparams: HyperParameters, *, seed: int, max_steps: int, samples: int,
               folds: int, baseline: str | None = None) -> DiscreteOuter | None:
    """A :class:`DiscreteOuter` when ``hparams`` has discrete hyperparameters, else ``None``;
    ``baseline`` replaces the REINFORCE hyperparameters' own (the online plan's one sample per
    window has no leave-one-out baseline)."""
    names = discrete_names(hparams)
    if not names:
        return None
    scored = [cast(DiscreteParameter, hparams[n]) for n in names
              if cast(DiscreteParameter, hparams[n]).mode == "reinforce"]
    # one loss, so one baseline (of the kind this run uses) and, for the moving average, one
    # decay (the other baselines read none)
    used = [(baseline or s.baseline, s.decay) for s in scored]
    if len({(kind, decay if kind == "moving_average" else None) for kind, decay in used}) > 1:
        got = [(s.baseline, s.decay) if s.baseline == "moving_average" else s.baseline
               for s in scored]
        raise HyperdiffError(
            "HyperOptimizer: the REINFORCE hyperparameters must share one baseline, and with "
            f"'moving_average' one decay (got {got})"
        )
    for name in names:
        spec = cast(DiscreteParameter, hparams[name])
        if (spec.mode == "reinforce" and (baseline or spec.baseline) == "leave_one_out"
                and samples < 2):
            key = option("samples", "outer.samples")
            raise HyperdiffError(
                f"HyperOptimizer: {key} must be >= 2 for the leave-one-out baseline of "
                f"{name!r} (got {samples}); use baseline='moving_average' or more samples"
            )
    return DiscreteOuter(hparams, seed=seed, max_steps=max_steps, samples=samples, folds=folds,
                         baseline=baseline)


__all__ = ["DiscreteOuter", "outer_hook"]
