"""Discretise and report: retrain the argmax configuration and show the relaxation gap.

A relaxed model (a mixture of options) is not the model one deploys: at the end each discrete
hyperparameter is fixed to its most probable choice and the model is retrained from scratch.
The *relaxation gap* is the difference between the relaxed and the discretised losses (on the
validation and the held-out test split). :class:`DiscreteTask` is a built-in task whose
evaluations (reports, ``hyperdiff compare``, black-box trials) train the discretised model,
and whose black-box interface takes plain choices (labels) for its discrete hyperparameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor

from ..errors import fail
from ..hyperparams import HyperParameters
from ..tasks.base import SearchRange, Task
from .kinds import DiscreteParameter, discrete_names, label, with_states


@dataclass(frozen=True)
class SearchChoices(SearchRange):
    """A discrete dimension of a black-box search space: one of ``choices`` (JSON-ready
    labels), suggested by Optuna as a categorical and drawn uniformly by random search."""

    choices: tuple[Any, ...] = ()

    @classmethod
    def of(cls, choices: Sequence[Any]) -> SearchChoices:
        labels = tuple(label(c) for c in choices)
        return cls(0.0, float(len(labels) - 1), False, labels)


def discretise(hparams: HyperParameters, raw: Mapping[str, Tensor] | None = None
               ) -> HyperParameters:
    """``hparams`` at ``raw`` with every discrete hyperparameter fixed to its argmax choice
    (a plain choice: one-hot weights, only that option evaluated)."""
    hp = hparams if raw is None else hparams.with_raw(dict(raw))
    current = hp.raw
    return with_states(hp, {n: {"sample": int(current[n].argmax())}
                            for n in discrete_names(hp)})


def fix_choices(hparams: HyperParameters, choices: Mapping[str, Any]) -> HyperParameters:
    """``hparams`` with the named discrete hyperparameters fixed to the given choices (or their
    labels, as :func:`~hyperdiff.discrete.kinds.label` writes them); logits set to put
    probability ~1 on them."""
    states, raw = {}, hparams.raw
    for name, choice in choices.items():
        spec = cast(DiscreteParameter, hparams[name])
        labels = [label(c) for c in spec.choices]
        if choice in spec.choices:
            index = spec.choices.index(choice)
        elif choice in labels:
            index = labels.index(choice)
        else:
            raise fail("fix_choices", f"choice of {name!r}", f"one of {labels}", choice)
        states[name] = {"sample": index}
        raw[name] = torch.full_like(raw[name], -20.0)
        raw[name][index] = 20.0
    return with_states(hparams.with_raw(raw), states)


@dataclass(frozen=True)
class DiscreteTask(Task):
    """A :class:`~hyperdiff.tasks.base.Task` with discrete hyperparameters: ``evaluate``
    retrains the discretised (argmax) model; ``evaluate_relaxed`` the model as tuned."""

    def _with_hparams(self, hparams: HyperParameters) -> Task:
        return Task(name=self.name, description=self.description, problems=self.problems,
                    final_problem=replace(self.final_problem, hparams=hparams),
                    splits=self.splits, metrics=self.metrics, search_space=self.search_space,
                    info=self.info, summarize=self.summarize)

    def evaluate(self, raw: Mapping[str, Tensor] | None = None, *,
                 seeds: tuple[int, ...] = (0,), segments: int = 1,
                 progress: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
        raw = self.hparams.raw if raw is None else dict(raw)
        fixed = discretise(self.final_problem.hparams, raw)
        return self._with_hparams(fixed).evaluate(raw, seeds=seeds, segments=segments,
                                                  progress=progress)

    def evaluate_relaxed(self, raw: Mapping[str, Tensor] | None = None, *,
                         seeds: tuple[int, ...] = (0,)) -> dict[str, dict[str, float]]:
        return Task.evaluate(self, raw, seeds=seeds)

    def evaluate_values(self, values: Mapping[str, Any], seeds: Sequence[int]
                        ) -> dict[str, dict[str, float]]:
        """Retrain at natural continuous values and plain discrete choices (labels)."""
        names = set(discrete_names(self.hparams))
        raw = self.hparams.raw
        continuous = {n: torch.as_tensor(v, dtype=torch.float64, device=raw[n].device)
                      for n, v in values.items() if n not in names}
        hp = fix_choices(self.hparams.with_natural(**continuous),
                         {n: v for n, v in values.items() if n in names})
        return self._with_hparams(hp).evaluate(hp.raw, seeds=tuple(seeds))

    def train_and_evaluate(self, values: Mapping[str, Any], seed: int = 0
                           ) -> dict[str, float]:
        report = self.evaluate_values(values, (seed,))
        out = {f"{split}_{key}": value for split, m in report.items() for key, value in m.items()}
        return {k: v for k, v in out.items() if not k.startswith("train_")}


def relaxation_gap(task: Task, raw: Mapping[str, Tensor], *, seeds: tuple[int, ...] = (0,)
                   ) -> dict[str, Any]:
    """The relaxed and the discretised model at ``raw``, each retrained from scratch on
    ``seeds``: ``{"choices", "relaxed", "discretised", "gap"}`` (gap = discretised - relaxed
    loss per split)."""
    relaxed = Task.evaluate(task, dict(raw), seeds=seeds)
    fixed = discretise(task.final_problem.hparams, raw)
    final = replace(task.final_problem, hparams=fixed)
    discrete = Task.evaluate(replace(task, final_problem=final), dict(raw), seeds=seeds)
    choices = {n: label(task.hparams[n].choices[int(raw[n].argmax())])  # type: ignore[attr-defined]
               for n in discrete_names(task.hparams)}
    gap = {s: discrete[s]["loss"] - relaxed[s]["loss"] for s in relaxed}
    return {"choices": choices, "relaxed": relaxed, "discretised": discrete, "gap": gap}


__all__ = ["DiscreteTask", "SearchChoices", "discretise", "fix_choices", "relaxation_gap"]
