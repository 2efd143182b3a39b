"""Learning-rate schedules defined for any horizon, and resampling of per-step schedules.

A schedule is a function ``f(s)`` of *normalised time* ``s = t / (N - 1)`` in ``[0, 1]``
(``s = 0`` for ``N = 1``), where ``t = 0 .. N-1`` is the inner step and ``N`` the horizon. The
same few parameters therefore describe a schedule for a 50-step unroll and for a 5000-step
run, and a schedule tuned on one horizon transfers unchanged to another
(:meth:`Schedule.with_steps`).

Parametric families (the parameters are hyperparameters of the collection, named
``f"{prefix}_{field}"``: ``lr_peak``, ``lr_warmup``, ...):

- ``warmup_cosine``:  ``peak * w(s) * (final + (1 - final) * (1 + cos(pi p)) / 2)``
- ``warmup_linear``:  ``peak * w(s) * (1 - (1 - final) * p)``
- ``exponential``:    ``peak * final ** s``  (from ``peak`` to ``final * peak``)
- ``step_decay``:     ``peak * gamma ** floor(drops * s)``  (``drops`` fixed, not tuned)

with the warmup ramp ``w(s) = min(s / warmup, 1)`` and the decay progress
``p = clamp((s - warmup) / (1 - warmup), 0, 1)``. Every value is a differentiable function of
the parameters (``peak`` positive, ``warmup`` and ``final`` in (0, 1), ``gamma`` in (0, 1));
in ``warmup`` it is smooth except where ``s = warmup`` falls on a step.

A schedule is a coefficient for the inner optimizers: ``hd.sgd(lr=schedule)`` reads
``schedule(hparams, step, param_name)`` at every step.

Resampling a ``per_step`` schedule of T values to M steps (:func:`resample`) is linear
interpolation on the same normalised time: value ``j`` of the result is the piecewise-linear
interpolant of ``(i / (T - 1), v_i)`` at ``j / (M - 1)``; the first and last values are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.errors import (
    POSITIVE,
    HyperdiffError,
    Range,
    describe,
    fail,
    is_number,
    number,
    positive_int,
)
from hyperdiff.hparams.hyperparams import HyperParameter, HyperParameters, per_step, scalar

FAMILIES = ("warmup_cosine", "warmup_linear", "exponential", "step_decay")
FIELDS: dict[str, tuple[str, ...]] = {
    "warmup_cosine": ("peak", "warmup", "final"),
    "warmup_linear": ("peak", "warmup", "final"),
    "exponential": ("peak", "final"),
    "step_decay": ("peak", "gamma"),
}
DEFAULTS: dict[str, float] = {"peak": 0.1, "warmup": 0.05, "final": 0.01, "gamma": 0.5}
UNIT = (0.0, 1.0)  # warmup, final and gamma live in the open interval (0, 1)
OPEN_UNIT = Range(0.0, 1.0, open_low=True, open_high=True)
WARMUP = ("warmup_cosine", "warmup_linear")  # 0 at s = 0: they need two steps or more


def checked_steps(caller: str, family: str, steps: Any) -> int:
    """``steps`` if it is a horizon ``family`` is defined over: a positive int, at least 2 for
    a warmup family (over one step its only value is the ramp's start, 0, which trains
    nothing), else raise :class:`HyperdiffError` naming the value."""
    steps = positive_int(caller, "steps", steps)
    if steps == 1 and family in WARMUP:
        raise HyperdiffError(
            f"{caller}: steps must be at least 2 for a {family} schedule (got 1): over one "
            "step its only value is the warmup's start, 0, so nothing would train; use "
            "2 steps or more, or the exponential or step_decay family")
    return steps


def _step(caller: str, name: str, step: Any) -> None:
    """Refuse a step that is not an int (a bool, a float, a string)."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise fail(caller, name, "an int", step)


def _fields(family: str, names: Mapping[str, str], hparams: Mapping[str, Any]
            ) -> dict[str, Tensor]:
    """The schedule's parameters read from ``hparams``; plain numbers become float64 tensors
    (on the device and in the dtype of a tensor among them, if one is)."""
    values = {f: hparams[n] for f, n in names.items()}
    if all(isinstance(v, Tensor) for v in values.values()):
        return values
    like = next((v for v in values.values() if isinstance(v, Tensor)), None)
    for f, v in values.items():
        if not isinstance(v, Tensor):
            if not is_number(v):
                raise fail(family, f"hyperparameter {names[f]!r}", "a tensor or a number", v)
            values[f] = torch.tensor(float(v), dtype=torch.float64 if like is None else
                                     like.dtype, device=None if like is None else like.device)
    return values


def normalised_time(step: int, steps: int) -> float:
    """``s = step / (steps - 1)`` (0 for a one-step horizon)."""
    return step / (steps - 1) if steps > 1 else 0.0


def _ramp(s: float, warmup: Tensor) -> Tensor:
    return torch.clamp(s / warmup, max=1.0)


def _progress(s: float, warmup: Tensor) -> Tensor:
    return torch.clamp((s - warmup) / (1.0 - warmup), 0.0, 1.0)


def _warmup_cosine(s: float, v: Mapping[str, Tensor], drops: int) -> Tensor:
    p = _progress(s, v["warmup"])
    decay = v["final"] + (1.0 - v["final"]) * 0.5 * (1.0 + torch.cos(math.pi * p))
    return v["peak"] * _ramp(s, v["warmup"]) * decay


def _warmup_linear(s: float, v: Mapping[str, Tensor], drops: int) -> Tensor:
    p = _progress(s, v["warmup"])
    return v["peak"] * _ramp(s, v["warmup"]) * (1.0 - (1.0 - v["final"]) * p)


def _exponential(s: float, v: Mapping[str, Tensor], drops: int) -> Tensor:
    return v["peak"] * v["final"] ** s


def _step_decay(s: float | Tensor, v: Mapping[str, Tensor], drops: int) -> Tensor:
    if isinstance(s, Tensor):  # several steps at once (Schedule.window)
        return v["peak"] * v["gamma"] ** torch.clamp(torch.floor(drops * s), max=drops)
    return v["peak"] * v["gamma"] ** min(math.floor(drops * s), drops)


CURVES: dict[str, Callable[[float, Mapping[str, Tensor], int], Tensor]] = {
    "warmup_cosine": _warmup_cosine, "warmup_linear": _warmup_linear,
    "exponential": _exponential, "step_decay": _step_decay,
}


def field_range(field_name: str) -> Range:
    """The values a schedule's field is defined for: ``peak`` positive, ``warmup``, ``final``
    and ``gamma`` in the open interval (0, 1) (module doc)."""
    return POSITIVE if field_name == "peak" else OPEN_UNIT


@dataclass(frozen=True)
class Schedule:
    """A parametric schedule over ``steps`` inner steps whose parameters are hyperparameters.

    Call it as an optimizer coefficient: ``schedule(hparams, step, param_name) -> Tensor``.
    """

    family: str
    steps: int
    prefix: str = "lr"
    drops: int = 3
    # the last value computed: an optimizer reads it once per parameter tensor at each step
    # (kept while the step, the autograd mode and the very tensors it read, unmodified, are
    # the same, and no backward pass has run through it, which may have freed its graph)
    _last: dict[str, Any] = field(init=False, repr=False, compare=False, default_factory=dict)

    @property
    def names(self) -> dict[str, str]:
        """Field -> hyperparameter name, e.g. ``{"peak": "lr_peak", ...}``."""
        return {f: f"{self.prefix}_{f}" for f in FIELDS[self.family]}

    def hyperparameters(self, **initial: float) -> dict[str, HyperParameter]:
        """Hyperparameter specs for the collection: ``hd.HyperParameters(**s.hyperparameters(
        peak=0.1, warmup=0.05))``; fields not given take :data:`DEFAULTS`."""
        unknown = sorted(set(initial) - set(FIELDS[self.family]))
        if unknown:
            raise fail(f"{self.family}", "the initial values' names",
                       f"among {list(FIELDS[self.family])}", unknown)
        out = {}
        for field_name, name in self.names.items():
            valid = field_range(field_name)  # the constraint's values
            value = number(self.family, field_name, initial.get(field_name, DEFAULTS[field_name]),
                           valid)
            out[name] = scalar(value, None if field_name == "peak" else UNIT)
        return out

    def with_steps(self, steps: int) -> Schedule:
        """The same schedule (same parameters) over another horizon."""
        return replace(self, steps=checked_steps(f"{self.family}.with_steps", self.family, steps))

    def value(self, hparams: Mapping[str, Tensor], step: int) -> Tensor:
        """The schedule's value at inner step ``step`` (differentiable in the parameters)."""
        _step(self.family, "step", step)
        if not 0 <= step < self.steps:
            raise HyperdiffError(
                f"{self.family}: step must be in [0, {self.steps}) (got {step}); the schedule "
                "is defined for a shorter run: use schedule.with_steps(N)"
            )
        values = _fields(self.family, self.names, hparams)
        read = [(t, t._version) for t in values.values()]
        mode = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        last = self._last
        if last.get("step") == step and last["mode"] == mode and not last["consumed"] and len(
                last["read"]) == len(read) and all(
                a is b and v == w for (a, v), (b, w) in zip(last["read"], read, strict=True)):
            return last["value"]  # the same tensors, unchanged: the value read a moment ago
        value = CURVES[self.family](normalised_time(step, self.steps), values, self.drops)
        consumed: list[bool] = []  # not the value itself: the hook must not hold its graph
        if value.requires_grad:
            try:
                value.register_hook(lambda grad: consumed.append(True))
            except RuntimeError:  # a tensor that takes no hook (a transform's): not kept
                consumed.append(True)
        last.update(read=read, step=step, mode=mode, consumed=consumed, value=value)
        return value

    def __deepcopy__(self, memo: dict[int, Any]) -> Schedule:
        """A copy without the cached value (which may hold an autograd graph)."""
        return replace(self)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last": {}}

    def window(self, hparams: Mapping[str, Tensor], start: int, stop: int) -> Tensor:
        """The values at steps ``start .. stop-1`` as one tensor, computed in one vectorised
        pass (equal to :meth:`value` step by step up to rounding; differentiable)."""
        _step(f"{self.family}.window", "start", start)
        _step(f"{self.family}.window", "stop", stop)
        if not 0 <= start < stop <= self.steps:
            raise HyperdiffError(f"{self.family}: the steps {start}..{stop - 1} must lie in "
                                 f"[0, {self.steps})")
        values = _fields(self.family, self.names, hparams)
        like = values[next(iter(values))]
        t = torch.arange(start, stop, dtype=like.dtype, device=like.device)
        s = t / (self.steps - 1) if self.steps > 1 else torch.zeros_like(t)
        return CURVES[self.family](s, values, self.drops)  # type: ignore[arg-type]

    def __call__(self, hparams: Mapping[str, Tensor], step: int, param: str = "") -> Tensor:
        return self.value(hparams, step)

    def values(self, hparams: Mapping[str, Tensor] | HyperParameters) -> Tensor:
        """All ``steps`` values as one tensor (natural values of a collection, or a mapping of
        tensors or numbers)."""
        natural = hparams.natural() if isinstance(hparams, HyperParameters) else hparams
        return torch.stack([self.value(natural, t) for t in range(self.steps)])


def schedule(family: str, steps: int, *, prefix: str = "lr", drops: int = 3) -> Schedule:
    """A parametric schedule: ``family`` one of :data:`FAMILIES` over ``steps`` inner steps.

    >>> import hyperdiff as hd
    >>> s = hd.schedule("warmup_cosine", 101)
    >>> hp = hd.HyperParameters(**s.hyperparameters(peak=0.2, warmup=0.1, final=0.1))
    >>> [round(float(v), 4) for v in s.values(hp)[[0, 5, 10, 100]]]
    [0.0, 0.1, 0.2, 0.02]
    """
    if family not in FAMILIES:
        raise fail("schedule", "family", f"one of {list(FAMILIES)}", family)
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise fail("schedule", "prefix", "an identifier such as 'lr'", prefix)
    drops = positive_int("schedule", "drops", drops)
    if drops != 3 and family != "step_decay":
        raise HyperdiffError(f"schedule: drops must be left out for a {family} schedule, only "
                             f"step_decay reads it (got {describe(drops)})")
    return Schedule(family, checked_steps("schedule", family, steps), prefix, drops)


def resample(values: Tensor, steps: int) -> Tensor:
    """A per-step schedule of T values resampled to ``steps`` values by linear interpolation on
    normalised time (module doc): ``out[j] = interp(j / (steps-1); i / (T-1), values[i])``."""
    steps = positive_int("resample", "steps", steps)
    if not isinstance(values, Tensor) or values.dim() != 1 or values.numel() == 0 or (
            not values.is_floating_point()):
        raise fail("resample", "values", "a non-empty 1-D tensor of a floating-point dtype",
                   values)
    count = values.numel()
    if count == 1:
        return values.expand(steps).clone()
    position = torch.linspace(0.0, count - 1.0, steps, dtype=torch.float64, device=values.device)
    low = position.floor().long().clamp(max=count - 2)
    weight = (position - low.to(torch.float64)).to(values.dtype)
    return torch.lerp(values[low], values[low + 1], weight)


def resampled(hparams: HyperParameters, steps: int) -> HyperParameters:
    """A collection whose ``per_step`` hyperparameters (current natural values) are resampled
    to ``steps`` entries (:func:`resample`); the others are kept as they are (their raw values
    bit for bit)."""
    natural = hparams.natural()
    specs: dict[str, Any] = {}
    for name, spec in hparams.items():
        if spec.kind == "per_step":
            specs[name] = per_step(steps, resample(natural[name], steps), spec.constraint)
        else:
            specs[name] = replace(spec, init=natural[name].detach().clone())
    out = HyperParameters(specs)  # raw values from the natural ones: per_step's resampled
    kept = {n: v for n, v in hparams.raw.items() if hparams[n].kind != "per_step"}
    return out.with_raw({**out.raw, **kept})


__all__ = ["FAMILIES", "Schedule", "normalised_time", "resample", "resampled", "schedule"]
