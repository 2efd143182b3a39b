"""Discrete hyperparameter kinds: ``categorical``, ``integer``, ``boolean``.

A discrete hyperparameter over choices ``c_1 .. c_n`` is stored in the same
:class:`~hyperdiff.hparams.hyperparams.HyperParameters` collection as the continuous ones. Its raw
value is a vector of logits ``u`` (shape ``(n,)``), its natural value the probabilities
``p = softmax(u)``; a loss reads it as a :class:`~hyperdiff.hparams.relax.Choice` and
evaluates it with :func:`~hyperdiff.hparams.relax.choose`. Each declares how it is
differentiated (``mode``):

- ``"relax"``: the loss mixes the options with weights ``softmax(u / tau)`` (exact
  hypergradients by every method); ``tau`` follows a geometric schedule over the outer steps.
- ``"gumbel"``: straight-through Gumbel-softmax, one sample per training seeded by the
  training's seed (so every method replays it).
- ``"reinforce"``: the training uses a sampled plain choice ``z ~ p``; the driver forms the
  score-function estimate ``(L(z) - b) * (onehot(z) - p)`` (see
  :mod:`hyperdiff.tuner.reinforce`).

Natural-unit hypergradients (``grad_natural``) of a discrete hyperparameter are the
hypergradients of its logits (a gradient on the probability simplex is not unique).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from hyperdiff.errors import HyperdiffError, Text, describe, fail, is_number
from hyperdiff.hparams import gumbel, relax
from hyperdiff.hparams.constraints import Constraint
from hyperdiff.hparams.hyperparams import HyperParameter, HyperParameters, _tensor
from hyperdiff.hparams.relax import Choice, choose, mix  # hd.discrete: what a loss reads
from hyperdiff.seeds import gumbel_seed

MODES = ("relax", "gumbel", "reinforce")
BASELINES = ("moving_average", "leave_one_out", "none")
DEFAULT_DECAY = 0.9  # of the moving-average baseline


@dataclass(frozen=True)
class Softmax(Constraint):
    """Logits ``u`` to probabilities ``p = softmax(u)``; ``to_raw(p) = log p - mean(log p)``.

    Not elementwise: :meth:`derivative` is 1, so ``grad_natural`` is the logits' gradient.
    """

    name = "softmax"

    def to_natural(self, raw: Tensor) -> Tensor:
        return torch.softmax(raw, dim=-1)

    def to_raw(self, natural: Tensor) -> Tensor:
        log = torch.log(natural)
        return log - log.mean()

    def derivative(self, raw: Tensor) -> Tensor:
        return torch.ones_like(raw)

    def valid(self, natural: Tensor) -> Tensor:
        return torch.isfinite(natural) & (natural > 0)

    def describe_valid(self) -> str:
        return "finite probabilities > 0"


@dataclass(frozen=True)
class DiscreteParameter(HyperParameter):
    """A discrete hyperparameter (see the module doc).

    Attributes:
        choices: the distinct, hashable choices.
        mode: ``"relax"``, ``"gumbel"`` or ``"reinforce"``.
        temperature: ``(start, end)`` of the geometric schedule over the outer steps
            (relax, gumbel); both > 0.
        baseline: REINFORCE baseline: ``"moving_average"`` (of past steps' losses),
            ``"leave_one_out"`` (over the step's samples; needs ``samples >= 2``) or ``"none"``.
        decay: the moving average's decay in [0, 1).
        current_temperature, sample, noise_seed: the state of one training, set by the outer
            loop (:mod:`hyperdiff.tuner.discrete_outer`): the temperature now, a fixed choice index
            (REINFORCE's sample, or a discretised configuration), the Gumbel noise seed.
    """

    choices: tuple[Any, ...] = ()
    mode: str = "relax"
    temperature: tuple[float, float] = (1.0, 1.0)
    baseline: str = "moving_average"
    decay: float = DEFAULT_DECAY
    current_temperature: float | None = None
    sample: int | None = None
    noise_seed: int = 0

    is_discrete: ClassVar[bool] = True

    def best_choice(self, raw: Tensor) -> Any:
        """The choice of the largest logit in ``raw``."""
        return self.choices[int(raw.detach().argmax())]

    def validate(self, name: str) -> None:
        self.check_options(f"HyperParameters: {self.kind} {name!r}")

    def check_options(self, where: str) -> None:
        """Refuse invalid choices, mode, temperature, baseline, decay or init, naming ``where``."""
        check_choices(where, self.choices)
        if self.mode not in MODES:
            raise HyperdiffError(f"{where}: mode must be one of {list(MODES)} "
                                 f"(got {self.mode!r})")
        for tau in (*self.temperature, self.current_temperature):
            if tau is not None and not (is_number(tau) and math.isfinite(tau) and tau > 0):
                raise HyperdiffError(
                    f"{where}: temperature must be a finite number > 0 or a (start, end) pair "
                    f"of them (got {describe(self.temperature)})"
                )
        if self.baseline not in BASELINES:
            raise HyperdiffError(f"{where}: baseline must be one of {list(BASELINES)} "
                                 f"(got {self.baseline!r})")
        if not (is_number(self.decay) and 0.0 <= self.decay < 1.0):
            raise HyperdiffError(f"{where}: decay must be in [0, 1) (got {self.decay!r})")
        if self.baseline != "moving_average" and self.decay != DEFAULT_DECAY:
            raise HyperdiffError(
                f"{where}: decay must be left at {DEFAULT_DECAY} with baseline="
                f"{self.baseline!r} (only the 'moving_average' baseline reads it; it would be "
                f"ignored) (got {self.decay!r})")
        if tuple(self.init.shape) != (len(self.choices),):
            raise HyperdiffError(
                f"{where}: init must hold one probability per choice, shape "
                f"({len(self.choices)},) (got shape {tuple(self.init.shape)})"
            )
        total = float(self.init.sum())
        if not abs(total - 1.0) <= 1e-6:  # else softmax(to_raw(init)) would silently rescale it
            raise HyperdiffError(
                f"{where}: init must be probabilities that sum to 1 (got {describe(self.init)}, "
                f"sum {total:.6g})"
            )

    def read(self, name: str, raw: Tensor) -> relax.Choice:
        """The :class:`~hyperdiff.hparams.relax.Choice` a loss reads for logits ``raw``."""
        probs = torch.softmax(raw, dim=-1)
        if self.sample is not None or self.mode == "reinforce":
            index = self.sample if self.sample is not None else int(probs.detach().argmax())
            return relax.Choice.fixed(name, self.choices, index, probs)
        tau = self.temperature[0] if self.current_temperature is None else self.current_temperature
        if self.mode == "gumbel":
            seed = gumbel_seed(self.noise_seed, name)
            weights = gumbel.straight_through(raw, tau, seed)
        else:
            weights = relax.relaxed_weights(raw, tau)
        return relax.Choice(name, self.choices, weights, probs)

    def index(self, choice: Any) -> int:
        """Position of ``choice`` among the choices."""
        if choice not in self.choices:
            raise fail(self.kind, "choice", f"one of {list(self.choices)}", choice)
        return self.choices.index(choice)

    def temperature_at(self, step: int, steps: int) -> float:
        """``start * (end / start) ** (step / (steps - 1))``: geometric over ``steps``."""
        start, end = self.temperature
        frac = min(step / max(steps - 1, 1), 1.0)
        return float(start * (end / start) ** frac)


def check_choices(caller: str, choices: tuple[Any, ...]) -> None:
    """Raise ``"<caller>: choices must be ... (got ...)"`` unless ``choices`` holds at least two
    distinct, hashable choices and no NaN or infinite number (a choice among one is no choice,
    and NaN != NaN would make two NaNs look distinct)."""
    if len(choices) < 2:
        raise fail(caller, "choices", "at least two distinct choices", list(choices))
    odd = [c for c in choices if is_number(c) and not math.isfinite(float(c))]
    if odd:
        raise fail(caller, "choices", "finite numbers or other hashable values", odd)
    try:
        counts = Counter(choices)
    except TypeError:
        raise fail(caller, "choices", "hashable", list(choices)) from None
    dups = [c for c, count in counts.items() if count > 1]
    if dups:
        raise fail(caller, "choices", "distinct", Text(f"duplicates {describe(dups)}"))
    texts = Counter(str(label(c)) for c in choices)  # what reports, logs and searches show
    same = sorted(t for t, count in texts.items() if count > 1)
    if same:
        raise fail(caller, "choices", "choices with distinct labels (a callable's __name__, "
                   "a value's text), which reports, logs and searches tell apart",
                   Text(f"several choices labelled {same}"))


def categorical(
    choices: Sequence[Hashable], *, mode: str = "relax", init: Sequence[float] | None = None,
    temperature: float | tuple[float, float] | None = None, baseline: str | None = None,
    decay: float | None = None, kind: str = "categorical",
) -> DiscreteParameter:
    """A choice among ``choices`` (strings, numbers, callables, ...); ``init``: initial
    probabilities (default uniform). See the module doc for ``mode`` and the other options:
    ``temperature`` (default 1) is read by ``relax`` and ``gumbel``, ``baseline`` (default
    ``"moving_average"``) and ``decay`` (default 0.9) by ``reinforce``, ``decay`` only with
    the moving-average baseline; an option that would be ignored is refused.

    >>> import hyperdiff as hd
    >>> hp = hd.HyperParameters(act=hd.categorical(["relu", "tanh"]), lr=hd.scalar(0.1))
    >>> hp.natural()["act"].tolist(), hp.best()
    ([0.5, 0.5], {'act': 'relu'})
    """
    options = tuple(choices) if isinstance(choices, (list, tuple, range)) else choices
    if not isinstance(options, tuple):
        raise fail("categorical", "choices", "a list or tuple of hashable choices", choices)
    unread = ({"temperature": temperature} if mode == "reinforce" else
              {"baseline": baseline, "decay": decay})
    for option_name, value in unread.items():
        readers = "relax and gumbel read it" if option_name == "temperature" else (
            "reinforce reads it")
        if value is not None:
            raise fail(kind, option_name, f"left out with mode={mode!r} (only {readers}; it "
                       "would be ignored)", value)
    if decay is not None and baseline in ("leave_one_out", "none"):
        raise fail(kind, "decay", f"left out with baseline={baseline!r} (only the "
                   "'moving_average' baseline reads it; it would be ignored)", decay)
    temperature = 1.0 if temperature is None else temperature
    baseline = "moving_average" if baseline is None else baseline
    decay = DEFAULT_DECAY if decay is None else decay
    check_choices(kind, options)
    n = len(options)
    host = torch.device("cpu")  # specs hold float64 host values, as hyperparams.scalar does
    if init is None:
        probs = torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64, device=host)
    else:
        probs = _tensor(init, kind, "init")  # a float64 host copy; HyperdiffError for non-numbers
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        temperature = (float(temperature), float(temperature))
    if not (isinstance(temperature, tuple) and len(temperature) == 2):
        raise fail("categorical", "temperature", "a number > 0 or a (start, end) pair",
                   temperature)
    param = DiscreteParameter(probs, Softmax(), kind, choices=options, mode=mode,
                              temperature=temperature, baseline=baseline, decay=decay)
    param.check_options(kind)  # at the call that got them, not when the set is built
    return param


def integer(low: int, high: int, **options: Any) -> DiscreteParameter:
    """A choice of an int in ``low .. high`` (both included), as a categorical over the range."""
    for what, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("integer", what, "an int", value)
    if high <= low:
        raise fail("integer", "high", f"an int > low={low} (two choices at least)", high)
    return categorical(tuple(range(low, high + 1)), kind="integer", **options)


def boolean(**options: Any) -> DiscreteParameter:
    """A choice of ``False`` or ``True``."""
    return categorical((False, True), kind="boolean", **options)


def label(choice: Any) -> Any:
    """A JSON-ready label of a choice: itself for str/int/float/bool/None, else its name."""
    if choice is None or isinstance(choice, (str, int, float, bool)):
        return choice
    return getattr(choice, "__name__", repr(choice))


def discrete_names(hparams: HyperParameters) -> list[str]:
    """Names of the discrete hyperparameters of ``hparams``, in order."""
    return [n for n, s in hparams.items() if isinstance(s, DiscreteParameter)]


def best_choices(hparams: HyperParameters, raw: dict[str, Tensor] | None = None
                 ) -> dict[str, Any]:
    """The argmax choice of every discrete hyperparameter at ``raw`` (default: current)."""
    raw = hparams.raw if raw is None else raw
    return {name: hparams[name].best_choice(raw[name]) for name in discrete_names(hparams)}


def with_states(hparams: HyperParameters, states: dict[str, dict[str, Any]]) -> HyperParameters:
    """A copy whose discrete specs carry per-training ``states`` (``{name: {field: value}}``:
    ``current_temperature``, ``sample``, ``noise_seed``); raw values unchanged."""
    from dataclasses import replace

    specs = {n: replace(s, **states[n]) if n in states else s for n, s in hparams.items()}
    return HyperParameters(specs, raw=hparams.raw)


__all__ = ["BASELINES", "MODES", "Choice", "DiscreteParameter", "Softmax", "best_choices",
           "boolean", "categorical", "choose", "discrete_names", "integer", "label", "mix",
           "with_states"]
