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
from dataclasses import dataclass, fields, replace
from typing import Any, cast

import torch
from torch import Tensor

from hyperdiff.app.tasks.base import SearchRange, Task
from hyperdiff.errors import fail
from hyperdiff.hparams.discrete import (
    DiscreteParameter,
    best_choices,
    discrete_names,
    label,
    with_states,
)
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.tuner.history import OptimizeResult


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
    labels, as :func:`~hyperdiff.hparams.discrete.label` writes them); logits set to put
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
    """A :class:`~hyperdiff.app.tasks.base.Task` with discrete hyperparameters: ``evaluate``
    retrains the discretised (argmax) model; ``evaluate_relaxed`` the model as tuned."""

    def _with_hparams(self, hparams: HyperParameters) -> Task:
        """A plain :class:`Task` (every field of this one) whose final problem has ``hparams``:
        its ``evaluate`` trains them as they are."""
        values = {f.name: getattr(self, f.name) for f in fields(Task) if f.init}
        values["final_problem"] = replace(self.final_problem, hparams=hparams)
        return Task(**values)

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

    def fixed_hparams(self, values: Mapping[str, Any]) -> HyperParameters:
        """The hyperparameters at natural continuous ``values`` and plain discrete choices
        (choices or their labels) among ``values``."""
        names = set(discrete_names(self.hparams))
        continuous = {n: v for n, v in values.items() if n not in names}  # checked by with_natural
        return fix_choices(self.hparams.with_natural(**continuous),
                           {n: v for n, v in values.items() if n in names})

    def evaluate_values(self, values: Mapping[str, Any], seeds: Sequence[int]
                        ) -> dict[str, dict[str, float]]:
        """Retrain at natural continuous values and plain discrete choices (labels)."""
        hp = self.fixed_hparams(values)
        return self._with_hparams(hp).evaluate(hp.raw, seeds=tuple(seeds))

    def outer_loss(self, values: Mapping[str, Any], seed: int = 0) -> float:
        """:meth:`Task.outer_loss <hyperdiff.app.tasks.base.Task.outer_loss>` (the mean
        validation loss over the inner problems, e.g. the cross-validation folds) of the plain
        architecture: discrete hyperparameters as choices (or labels) in ``values``."""
        hp = self.fixed_hparams(values)
        plain = replace(self, problems=tuple(replace(p, hparams=hp) for p in self.problems))
        return Task.outer_loss(plain, {})

    def final_report_extra(self, outcome: OptimizeResult, report: Mapping[str, Any], *,
                           seeds: tuple[int, ...], segments: int = 1,
                           progress: Callable[[], None] | None = None) -> dict[str, Any]:
        """The ``discrete`` entry of ``hyperdiff run``'s result (see :func:`final_report`)."""
        return {"discrete": final_report(self, outcome, report, seeds=seeds,
                                         segments=segments, progress=progress)}

    def train_and_evaluate(self, values: Mapping[str, Any], seed: int = 0
                           ) -> dict[str, float]:
        report = self.evaluate_values(values, (seed,))
        out = {f"{split}_{key}": value for split, m in report.items() for key, value in m.items()}
        return {k: v for k, v in out.items() if not k.startswith("train_")}


def relaxed(hparams: HyperParameters, temperatures: Mapping[str, float] | None = None
            ) -> HyperParameters:
    """The relaxed model as tuned: every ``relax`` and ``gumbel`` hyperparameter as the
    noise-free mixture ``softmax(u / tau)`` with ``tau = temperatures[name]`` (default: the
    schedule's start); ``reinforce`` ones stay plain argmax choices (their trainings only
    ever see plain choices, so they have no relaxed model)."""
    states = {}
    for name in discrete_names(hparams):
        spec = cast(DiscreteParameter, hparams[name])
        if spec.mode != "reinforce":
            tau = (temperatures or {}).get(name, spec.temperature[0])
            states[name] = {"mode": "relax", "current_temperature": float(tau)}
    return with_states(hparams, states)


def has_relaxation(hparams: HyperParameters) -> bool:
    """Whether any discrete hyperparameter is relaxed in training (mode relax or gumbel)."""
    return any(cast(DiscreteParameter, hparams[n]).mode != "reinforce"
               for n in discrete_names(hparams))


def _evaluate_with(task: Task, hparams: HyperParameters, raw: Mapping[str, Tensor],
                   **options: Any) -> dict[str, dict[str, float]]:
    """:meth:`Task.evaluate` of ``task``'s final training with ``hparams``' specs."""
    final = replace(task.final_problem, hparams=hparams)
    return Task.evaluate(replace(task, final_problem=final), dict(raw), **options)


def chosen_labels(hparams: HyperParameters, raw: Mapping[str, Tensor]) -> dict[str, Any]:
    """The argmax choice (as a label) of every discrete hyperparameter at ``raw``."""
    return {n: label(choice) for n, choice in best_choices(hparams, dict(raw)).items()}


def relaxation_gap(task: Task, raw: Mapping[str, Tensor], *, seeds: tuple[int, ...] = (0,),
                   temperatures: Mapping[str, float] | None = None, segments: int = 1,
                   progress: Callable[[], None] | None = None,
                   discretised: Mapping[str, Mapping[str, float]] | None = None,
                   ) -> dict[str, Any]:
    """The relaxed (:func:`relaxed`, at ``temperatures``) and the discretised model at
    ``raw``, each retrained from scratch on ``seeds``: ``{"choices", "relaxed",
    "discretised", "gap"}`` (gap = discretised - relaxed loss per split). ``discretised``:
    the discretised metrics when already computed (not retrained again)."""
    options: dict[str, Any] = {"seeds": seeds, "segments": segments, "progress": progress}
    hp = task.final_problem.hparams
    relaxed_metrics = _evaluate_with(task, relaxed(hp, temperatures), raw, **options)
    if discretised is None:
        discretised = _evaluate_with(task, discretise(hp, raw), raw, **options)
    discrete = {s: dict(m) for s, m in discretised.items()}
    gap = {s: discrete[s]["loss"] - relaxed_metrics[s]["loss"]
           for s in relaxed_metrics if "loss" in relaxed_metrics[s] and s in discrete}
    return {"choices": chosen_labels(hp, raw), "relaxed": relaxed_metrics,
            "discretised": discrete, "gap": gap}


def final_report(task: Task, outcome: OptimizeResult, report: Mapping[str, Any], *,
                 seeds: tuple[int, ...], segments: int = 1,
                 progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """The discrete part of ``hyperdiff run``'s result: the chosen values at the initial and
    the tuned hyperparameters, and at the tuned ones the relaxed model (at the best step's
    temperatures) retrained next to the discretised one (``report["tuned"]["metrics"]``:
    :class:`DiscreteTask` reports the argmax configuration retrained from scratch).

    Returns ``{"initial_choices", "choices", "probabilities", "temperatures", "relaxed",
    "discretised", "gap"}``; ``relaxed`` and ``gap`` are ``None`` when every discrete
    hyperparameter is REINFORCE (no relaxed model).
    """
    hp, raw = task.hparams, outcome.best_raw
    record = next((r for r in outcome.history if r.step == outcome.best_step), None)
    temperatures = dict((record.discrete or {}).get("temperature", {})) if record else {}
    discretised = report["tuned"]["metrics"]
    out: dict[str, Any] = {
        "initial_choices": chosen_labels(hp, hp.raw), "choices": chosen_labels(hp, raw),
        "probabilities": {n: float(torch.softmax(raw[n].detach().double(), -1).max())
                          for n in discrete_names(hp)},
        "temperatures": temperatures, "relaxed": None,
        "discretised": {s: dict(m) for s, m in discretised.items()}, "gap": None}
    if has_relaxation(hp):
        gap = relaxation_gap(task, raw, seeds=seeds, temperatures=temperatures,
                             segments=segments, progress=progress, discretised=discretised)
        out.update(relaxed=gap["relaxed"], gap=gap["gap"])
    return out


SPLIT_LABELS = {"val": "val loss", "selection": "selection loss", "test": "test loss (held out)"}


def choice_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Table rows ``(name, initial choice, tuned choice (p probability))``."""
    part = result["discrete"]
    return [(name, str(part["initial_choices"][name]),
             f"{choice} (p {part['probabilities'][name]:.2f})")
            for name, choice in part["choices"].items()]


def gap_lines(result: Mapping[str, Any]) -> list[str]:
    """The relaxation-gap table under ``hyperdiff run``'s table."""
    part = result["discrete"]
    chosen = ", ".join(f"{n}={c}" for n, c in part["choices"].items())
    if part["relaxed"] is None:
        return ["", f"discretised (the tuned column): {chosen}, retrained from scratch",
                "(REINFORCE trains plain choices: no relaxed model to compare)"]
    taus = {f"{t:.3g}" for t in part["temperatures"].values()}
    tau = (taus.pop() if len(taus) == 1 else ", ".join(
        f"{n} {t:.3g}" for n, t in part["temperatures"].items())) or "of the schedule start"
    lines = ["", f"discretised (the tuned column): {chosen}, retrained from scratch;",
             f"relaxation gap: against the relaxed mixture at temperature {tau}", "",
             f"{'':<24}{'relaxed':<12}{'discretised':<13}gap"]
    labels = {**SPLIT_LABELS, **({"val": "val loss (CV pool)"} if result.get("cv_folds") else {})}
    for split, text in labels.items():
        if split in part["gap"]:
            lines.append(f"{text:<24}{part['relaxed'][split]['loss']:<12.4f}"
                         f"{part['discretised'][split]['loss']:<13.4f}"
                         f"{part['gap'][split]:+.4f}")
    return lines


__all__ = ["DiscreteTask", "SearchChoices", "choice_rows", "discretise", "final_report",
           "fix_choices", "gap_lines", "has_relaxation", "relaxation_gap", "relaxed"]
