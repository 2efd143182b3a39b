"""Discretise and report: retrain the argmax configuration and show the relaxation gap.

A relaxed model (a mixture of options) is not the model one deploys: at the end each discrete
hyperparameter is fixed to its most probable choice and the model is retrained from scratch.
The *relaxation gap* is the difference between the relaxed and the discretised losses (on the
validation and the held-out test split). Every task with discrete hyperparameters gets this
report (``hyperdiff run`` calls :func:`final_report` when ``discrete_names(hparams)`` is
non-empty); its evaluations (reports, ``hyperdiff compare``, black-box trials) train the
discretised model (:mod:`hyperdiff.hparams.choices`), with no special task class.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor

from hyperdiff.app.tasks.base import SearchChoices, Task
from hyperdiff.errors import HyperdiffError, is_number
from hyperdiff.hparams.choices import discretise, fix_choices, fixed_hparams
from hyperdiff.hparams.discrete import (
    DiscreteParameter,
    best_choices,
    discrete_names,
    label,
    with_states,
)
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.tuner.distributed.spread import Spreader
from hyperdiff.tuner.history import OptimizeResult


class _DiscreteTask(Task):
    """Deprecated: a plain :class:`~hyperdiff.app.tasks.base.Task` (every task with discrete
    hyperparameters now reports and searches their plain choices); kept for one release."""

    def evaluate_relaxed(self, raw: Mapping[str, Tensor] | None = None, *,
                         seeds: tuple[int, ...] = (0,)) -> dict[str, dict[str, float]]:
        """The model as tuned (a relaxed mixture stays a mixture)."""
        raw = self.hparams.raw if raw is None else dict(raw)
        return self.evaluate_as(self.final_problem.hparams, raw, seeds=seeds)

    def fixed_hparams(self, values: Mapping[str, Any]) -> HyperParameters:
        """:func:`~hyperdiff.hparams.choices.fixed_hparams` of this task's hyperparameters."""
        return fixed_hparams(self.hparams, values)


DEPRECATED = ("hyperdiff.app.discrete_report.DiscreteTask is deprecated and will be removed in the "
              "next release: a task whose hyperparameters include hd.categorical, hd.integer or "
              "hd.boolean gets the discretised report and the choice-aware search without it; "
              "drop task_type=DiscreteTask (the replacement is nothing)")


def __getattr__(name: str) -> Any:
    """``DiscreteTask``: the deprecated alias, with a :class:`DeprecationWarning`."""
    if name == "DiscreteTask":
        warnings.warn(DEPRECATED, DeprecationWarning, stacklevel=2)
        return _DiscreteTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def relaxed(hparams: HyperParameters, temperatures: Mapping[str, float] | None = None
            ) -> HyperParameters:
    """The relaxed model as tuned: every ``relax`` and ``gumbel`` hyperparameter as the
    noise-free mixture ``softmax(u / tau)`` with ``tau = temperatures[name]`` (default: the
    schedule's start); ``reinforce`` ones stay plain argmax choices (their trainings only
    ever see plain choices, so they have no relaxed model: a temperature for one is refused)."""
    names = discrete_names(hparams)
    relaxable = [n for n in names if cast(DiscreteParameter, hparams[n]).mode != "reinforce"]
    unknown = sorted(set(temperatures or {}) - set(relaxable))
    scored = [n for n in unknown if n in names]  # REINFORCE ones
    if scored:
        raise HyperdiffError(f"relaxed: temperatures must name relax or gumbel hyperparameters "
                             f"among {relaxable}, not REINFORCE ones, which train plain choices "
                             f"and have no relaxed model (got {unknown})")
    if unknown:
        raise HyperdiffError(f"relaxed: temperatures must name discrete hyperparameters "
                             f"among {relaxable} (got {unknown})")
    states = {}
    for name in names:
        spec = cast(DiscreteParameter, hparams[name])
        if spec.mode != "reinforce":
            tau = (temperatures or {}).get(name, spec.temperature[0])
            if not (is_number(tau) and 0 < float(tau) < math.inf):
                raise HyperdiffError(f"relaxed: the temperature of {name!r} must be a positive "
                                     f"finite number (got {tau!r})")
            states[name] = {"mode": "relax", "current_temperature": float(tau)}
    return with_states(hparams, states)


def has_relaxation(hparams: HyperParameters) -> bool:
    """Whether any discrete hyperparameter is relaxed in training (mode relax or gumbel)."""
    return any(cast(DiscreteParameter, hparams[n]).mode != "reinforce"
               for n in discrete_names(hparams))


def chosen_labels(hparams: HyperParameters, raw: Mapping[str, Tensor]) -> dict[str, Any]:
    """The argmax choice (as a label) of every discrete hyperparameter at ``raw``."""
    return {n: label(choice) for n, choice in best_choices(hparams, dict(raw)).items()}


def relaxation_gap(task: Task, raw: Mapping[str, Tensor], *, seeds: tuple[int, ...] = (0,),
                   temperatures: Mapping[str, float] | None = None, segments: int = 1,
                   progress: Callable[[], None] | None = None,
                   discretised: Mapping[str, Mapping[str, float]] | None = None,
                   spread: Spreader | None = None) -> dict[str, Any]:
    """The relaxed (:func:`relaxed`, at ``temperatures``) and the discretised model at
    ``raw``, each retrained from scratch on ``seeds``: ``{"choices", "relaxed",
    "discretised", "gap"}`` (gap = discretised - relaxed loss per split). ``discretised``:
    the discretised metrics when already computed (not retrained again); ``spread`` maps
    the trainings (over the ranks of a process group)."""
    options: dict[str, Any] = {"seeds": seeds, "segments": segments, "progress": progress,
                               "spread": spread}
    hp = task.final_problem.hparams
    requests = [(relaxed(hp, temperatures), raw)]
    if discretised is None:
        requests.append((discretise(hp, raw), raw))
    relaxed_metrics, *rest = task.evaluate_as_all(requests, **options)
    discretised = rest[0] if discretised is None else discretised
    discrete = {s: dict(m) for s, m in discretised.items()}
    gap = {s: discrete[s]["loss"] - relaxed_metrics[s]["loss"]
           for s in relaxed_metrics if "loss" in relaxed_metrics[s] and s in discrete}
    return {"choices": chosen_labels(hp, raw), "relaxed": relaxed_metrics,
            "discretised": discrete, "gap": gap}


def final_report(task: Task, outcome: OptimizeResult, report: Mapping[str, Any], *,
                 seeds: tuple[int, ...], segments: int = 1,
                 progress: Callable[[], None] | None = None,
                 spread: Spreader | None = None) -> dict[str, Any]:
    """The discrete part of ``hyperdiff run``'s result: the chosen values at the initial and
    the tuned hyperparameters, and at the tuned ones the relaxed model (at the best step's
    temperatures) retrained next to the discretised one (``report["tuned"]["metrics"]``:
    every task reports the argmax configuration retrained from scratch).

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
                             segments=segments, progress=progress, discretised=discretised,
                             spread=spread)
        out.update(relaxed=gap["relaxed"], gap=gap["gap"])
    return out


SPLIT_LABELS = {"val": "val loss", "selection": "selection loss", "test": "test loss (held out)"}


def online_choices(task: Task, raw: Mapping[str, Tensor], report: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """The discrete part of an online run's result, in :func:`final_report`'s layout: the
    choices at the start and at the final values (the tuned column retrains those) and their
    probabilities; no relaxation gap is retrained (``"online": True``: the relaxed model is the
    run's own, in ``online_model``)."""
    hp = task.hparams
    return {"initial_choices": chosen_labels(hp, hp.raw), "choices": chosen_labels(hp, raw),
            "probabilities": {n: float(torch.softmax(raw[n].detach().double(), -1).max())
                              for n in discrete_names(hp)},
            "temperatures": {}, "relaxed": None, "gap": None, "online": True,
            "discretised": {s: dict(m) for s, m in report["tuned"]["metrics"].items()}}


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
        why = ("(an online run: its relaxed model is the run's own model, online_model)"
               if part.get("online") else
               "(REINFORCE trains plain choices: no relaxed model to compare)")
        return ["", f"discretised (the tuned column): {chosen}, retrained from scratch", why]
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


__all__ = ["SearchChoices", "choice_rows", "discretise", "final_report", "fix_choices",
           "fixed_hparams", "gap_lines", "has_relaxation", "relaxation_gap", "relaxed"]
