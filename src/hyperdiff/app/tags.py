"""The one naming scheme of what the loggers (TensorBoard, MLflow) write about a run.

=============================  ==========================================  =====================
tag                            value                                       step
=============================  ==========================================  =====================
``hparam/NAME``                a scalar hyperparameter's natural value     outer step / window
``hparam/NAME/I``              entry ``I`` of a vector of at most
                               :data:`VECTOR_LIMIT` entries                outer step / window
``hparam/NAME/mean|min|max``   a longer vector's summary                   outer step / window
``hparam/NAME/p/CHOICE``       a discrete hyperparameter's probability
                               of ``CHOICE``                               outer step / window
``loss/train|val|val_std``     the step's (window's) training and
                               validation losses                           outer step / window
``loss/selection``             the selection split's loss                  outer step / window
``outer/lr``                   the OUTER learning rate (of the raw values)  outer step / window
``outer/grad_norm|grad_std|``  the hypergradient's norm, spread and
``grad_snr``, ``outer/trainings``  signal-to-noise ratio; trainings so far  outer step / window
``inner/COEF``                 the inner optimizer's coefficient ``COEF``
                               (``lr``, ``weight_decay``, ...) used at
                               inner step ``t``: the model's own rate       inner step ``t``
                                                                            (online only)
``test/METRIC``, ``val/...``   the final report at the tuned values
``initial/SPLIT/METRIC``       ... at the initial values
``online_model/SPLIT/METRIC``  ... of the model the online run trained      the run's outer steps
=============================  ==========================================  =====================

A step is the record's ``step`` (offline: the outer step; online: the window). ``inner/COEF``
is the mean over the parameter tensors (one value for a scalar or a schedule). Characters
outside letters, digits, ``_ - . /`` and space in a name or a choice become ``_``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hyperdiff.engine.optimizers import resolve
from hyperdiff.engine.problem import Problem
from hyperdiff.hparams.discrete import label
from hyperdiff.hparams.hyperparams import HParamView, HyperParameter
from hyperdiff.hparams.schedules import Schedule
from hyperdiff.tuner.history import StepRecord
from hyperdiff.tuner.hot_start import FRACTION
from hyperdiff.tuner.windows import window_stop

VECTOR_LIMIT = 16
"""Vectors of at most this many entries get one tag per entry; longer ones mean, min, max."""
RECORD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val",
               "val_loss_std": "loss/val_std", "selection_loss": "loss/selection",
               "lr": "outer/lr", "grad_norm": "outer/grad_norm", "grad_std": "outer/grad_std",
               "grad_snr": "outer/grad_snr", "trainings": "outer/trainings"}
REPORT_SIDES = {"tuned": "", "initial": "initial/", "online_model": "online_model/"}
PARAM_SECTIONS = ("task", "inner", "method", "outer", "stop", "guard", "report")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


def safe(name: Any) -> str:
    """``name`` as text that TensorBoard and MLflow both take (module doc)."""
    return _UNSAFE.sub("_", str(name))


def hparam_tags(values: Mapping[str, Any],
                specs: Mapping[str, HyperParameter] | None = None) -> dict[str, float]:
    """Natural values (a float per scalar, a list per vector, as in a record) by tag;
    ``specs`` name a discrete hyperparameter's choices. ``None`` entries are left out."""
    out: dict[str, float] = {}
    for name, value in values.items():
        spec = None if specs is None else specs.get(name)
        head = f"hparam/{safe(name)}"
        if value is None:
            continue
        if not isinstance(value, list):
            out[head] = float(value)
        elif spec is not None and spec.is_discrete:
            choices = getattr(spec, "choices", ())
            out.update({f"{head}/p/{safe(label(c))}": float(p)
                        for c, p in zip(choices, value, strict=True) if p is not None})
        elif len(value) <= VECTOR_LIMIT:
            out.update({f"{head}/{i}": float(v) for i, v in enumerate(value) if v is not None})
        elif any(v is not None for v in value):
            known = [float(v) for v in value if v is not None]
            out.update({f"{head}/mean": sum(known) / len(known), f"{head}/min": min(known),
                        f"{head}/max": max(known)})
    return out


def record_tags(record: StepRecord,
                specs: Mapping[str, HyperParameter] | None = None) -> dict[str, float]:
    """One record's losses, outer-loop numbers and hyperparameters by tag (``None`` and
    non-finite values left out)."""
    out = {tag: float(getattr(record, key)) for key, tag in RECORD_TAGS.items()
           if getattr(record, key) is not None and math.isfinite(getattr(record, key))}
    return {**out, **hparam_tags(record.hparams, specs)}


def window_steps(loop: Any, record: StepRecord) -> range:
    """The inner steps that an online loop's window ``record`` trained, read from the loop
    after the step (its online plan's ``span``, the window it trained, which the plan's
    ``inner_step`` reached); empty for a failed window, a window that was restarted over (hot
    start: the plan is back at step 0) and a loop without inner steps (offline)."""
    plan = getattr(loop, "plan", loop)
    span, reached = getattr(plan, "span", None), getattr(plan, "inner_step", None)
    if record.status != "ok" or not isinstance(span, tuple) or reached != span[1]:
        return range(0)
    return range(*span)


def kept_windows(loop: Any, records: Sequence[StepRecord]) -> list[range]:
    """The inner steps of each of ``records`` (an online loop's history, in order) that the
    run kept, as :func:`window_steps` read them live: each ok window from where the one before
    ended (:func:`~hyperdiff.tuner.windows.window_stop`), a failed one empty. A loop that
    restarted (hot start) did so at the first ok window that reached
    :data:`~hyperdiff.tuner.hot_start.FRACTION` of the run (as
    :func:`~hyperdiff.tuner.online_checkpoint.trained_steps` finds it): the windows up to it
    are empty, the pass it abandoned. All empty for a loop without inner steps (offline)."""
    plan = getattr(loop, "plan", loop)
    if not isinstance(getattr(plan, "span", None), tuple):
        return [range(0)] * len(records)
    steps, restart = plan.problem.steps, bool(getattr(plan, "restarted", False))
    target = math.ceil(FRACTION * steps)
    out: list[range] = []
    position = 0
    for record in records:
        if record.status != "ok":
            out.append(range(0))
            continue
        start, position = position, window_stop(position, steps, plan.window, plan.growth)
        out.append(range(start, position))
        if restart and start < target <= position:
            out, position, restart = [range(0)] * len(out), 0, False
    return out


def kept_inner_tags(problem: Problem, loop: Any, records: Sequence[StepRecord]
                    ) -> dict[int, dict[str, float]]:
    """:func:`inner_tags` of every window of ``records`` that the run kept
    (:func:`kept_windows`): what the loggers drew of them live, computed again on resume."""
    out: dict[int, dict[str, float]] = {}
    for record, steps in zip(records, kept_windows(loop, records), strict=True):
        out.update(inner_tags(problem, record.hparams, steps))
    return out


def inner_points(problem: Problem | None, loop: Any, backlog: Sequence[StepRecord],
                 record: StepRecord) -> dict[int, dict[str, float]]:
    """The inner steps a logger draws with ``record`` (``{t: {tag: value}}``): those of the
    window it trained and, first, those of ``backlog``'s kept windows (a resumed run's
    history: :func:`kept_inner_tags`); none without ``problem``."""
    if problem is None:
        return {}
    values = kept_inner_tags(problem, loop, backlog) if backlog else {}
    values.update(inner_tags(problem, record.hparams, window_steps(loop, record)))
    return values


def inner_tags(problem: Problem, natural: Mapping[str, Any], steps: range
               ) -> dict[int, dict[str, float]]:
    """``{t: {"inner/COEF": value}}``: each coefficient of ``problem``'s inner optimizer that
    reads hyperparameters (a name, a schedule, a function), evaluated at the natural values
    ``natural`` (a record's) at inner step ``t``, averaged over the parameter tensors."""
    coefficients = {name: c for name, c in problem.optimizer.coefficients.items()
                    if isinstance(c, str) or callable(c)}
    if not coefficients or not steps or any(v is None or (isinstance(v, list) and None in v)
                                            for v in natural.values()):
        return {}
    specs = problem.hparams
    raw = {n: s.constraint.to_raw(torch.tensor(natural[n], dtype=torch.float64, device="cpu"))
           for n, s in specs.items()}  # host values, as the specs' own
    view = specs.view(raw)
    with torch.no_grad():
        curves = {f"inner/{safe(name)}": _curve(c, view, specs, steps, list(problem.params))
                  for name, c in coefficients.items()}
    return {t: {tag: curve[i] for tag, curve in curves.items()} for i, t in enumerate(steps)}


def _curve(coef: Any, view: HParamView, specs: Mapping[str, HyperParameter], steps: range,
           params: list[str]) -> list[float]:
    """A coefficient's values at ``steps``, each the mean over ``params``: a schedule in one
    vectorised pass, a hyperparameter that does not vary with the step once, anything else
    (a function) step by step and parameter by parameter."""
    if isinstance(coef, Schedule):
        return coef.window(view, steps.start, steps.stop).tolist()

    def mean_at(t: int) -> float:  # a host number: the hyperparameters' specs live on the CPU
        return sum(float(torch.as_tensor(resolve(coef, view, t, p), dtype=torch.float64,
                                         device="cpu").mean()) for p in params) / len(params)

    if isinstance(coef, str) and specs[coef].kind != "per_step":
        return [mean_at(steps.start)] * len(steps)
    return [mean_at(t) for t in steps]


def report_tags(result: Mapping[str, Any]) -> dict[str, float]:
    """The final report's metrics by tag: ``SPLIT/METRIC`` at the tuned values (the held-out
    ``test/METRIC`` among them), ``initial/SPLIT/METRIC``, ``online_model/SPLIT/METRIC``."""
    out: dict[str, float] = {}
    for side, prefix in REPORT_SIDES.items():
        entry = result.get(side) or {}
        metrics = entry.get("metrics", {}) if side != "online_model" else entry
        for split, values in metrics.items():
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    out[f"{prefix}{safe(split)}/{safe(key)}"] = float(value)
    return out


def run_params(config: Any) -> dict[str, str | int | float | bool]:
    """The config's keys that shape the run, ``"section.key": value`` (lists and tables as
    JSON text): the columns of TensorBoard's HParams view and MLflow's params."""
    out: dict[str, str | int | float | bool] = {}
    for section, values in config.to_dict().items():
        if section not in PARAM_SECTIONS:
            continue
        for key, value in values.items():
            plain = isinstance(value, (str, int, float, bool))
            out[f"{section}.{key}"] = value if plain else json.dumps(value, sort_keys=True)
    return out


__all__ = ["RECORD_TAGS", "VECTOR_LIMIT", "hparam_tags", "inner_points", "inner_tags",
           "kept_inner_tags", "kept_windows", "record_tags", "report_tags", "run_params", "safe",
           "window_steps"]
