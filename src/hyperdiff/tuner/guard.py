"""The divergence guard of the outer loop.

An outer step fails when

- inner training diverged, or a loss or hypergradient is not finite (a ``NonFiniteError`` from
  the method);
- the values ``lam_s`` it was asked to evaluate are outside their constraint
  (:meth:`DivergenceGuard.check_values`): the last update overflowed a raw value to a natural
  value that is infinite or NaN, or under/overflowed it onto a bound (a positive value that is
  exactly 0.0, an interval value equal to an end), in float64 or in the dtype training reads
  it in (0.99999999999 in ``(0, 1)`` is 1.0 in float32: make_problem refuses such a start, and
  a global phase's point there fails). Such a step trains nothing;
- a validation or selection loss is absurd (:meth:`DivergenceGuard.check_losses`): finite but
  ``|L| > max_loss_ratio * max(|L_0|, 1)``, with ``L_0`` the same loss at the first outer step
  (default ratio ``1e6``). A training that blew up to 1e39 has not produced a hypergradient
  worth following. The floor 1 keeps a near-zero initial loss from making every step absurd.
  At the first outer step, which sets ``L_0``, a start that is itself diverged must not become
  the reference: there the limit is ``min(START_LOSS_RATIO, max_loss_ratio) * max(|U|, 1)``
  with ``U`` the same loss of the untrained model (theta_0 on the same batches; default ratio
  ``1e3``). At every step a loss above :data:`OVERFLOW_LOSS` (``1e30``) is absurd, whatever
  the reference. ``max_loss_ratio=inf`` turns all of these off. A window that evaluates no
  validation loss (an online run's plain window after its values settled,
  :mod:`hyperdiff.tuner.settling`) has its mean train loss checked by the same rule against
  the last tuned window's (:meth:`DivergenceGuard.check_train_loss`).

Then the driver goes back to the snapshot of the last successful step (its raw values, outer
optimizer state and warm-start parameters), multiplies the outer learning rate by ``shrink``
and goes on. ``max_failures`` failures in a row end the run with a
:class:`~hyperdiff.errors.NonFiniteError` that says what happened (and how many failed steps
in a row before them the guard did not count). A failure the plan does not
count (``counted=False``: a point of the offline global phase, which is an independent trial,
not a step of the outer learning rate) restores the snapshot too, but neither cuts the outer
learning rate nor counts toward ``max_failures``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.engine.training import initial_state, validation_loss
from hyperdiff.errors import NonFiniteError, fail, is_number
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.typing import Batch, Params
from hyperdiff.wording import option

START_LOSS_RATIO = 1e3  # the first step's loss over the untrained model's, above it: diverged
OVERFLOW_LOSS = 1e30  # a loss above it is absurd at any step (float32 overflows at 3.4e38)


@dataclass
class DivergenceGuard:
    """Counts failures, holds the last good snapshot and the learning-rate scale."""

    shrink: float = 0.5
    max_failures: int = 5
    scale: float = 1.0
    failures: int = 0
    total_failures: int = 0
    good: Any = None
    max_loss_ratio: float = 1e6
    reference: dict[str, float] = field(default_factory=dict)
    caller: str = "HyperOptimizer"  # names the loop in messages (OnlineTuner: online mode)

    def __post_init__(self) -> None:
        ratio = self.max_loss_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1:
            raise fail(self.caller, "max_loss_ratio", "a number > 1 (inf: off)", ratio)
        if not (is_number(self.shrink) and 0.0 < self.shrink < 1.0):
            raise fail(self.caller, "guard shrink", "in (0, 1)", self.shrink)
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or (
            self.max_failures < 1
        ):
            raise fail(self.caller, "guard max_failures", "a positive int", self.max_failures)

    def check_values(self, hparams: HyperParameters, raw: dict[str, Tensor],
                     dtypes: Sequence[torch.dtype] = ()) -> None:
        """Raise ``NonFiniteError`` if a natural value of ``raw`` is outside its constraint, in
        float64 or as training reads it in one of ``dtypes`` (its raw value cast to the dtype,
        then transformed: the rule of
        :func:`~hyperdiff.hparams.hyperparams.check_representable`, which refuses such a
        start; 0.99999999999 in ``(0, 1)`` is 1.0 in float32)."""
        start = 0
        for name, value in hparams.natural(raw).items():
            spec = hparams[name]
            flat = value.detach().reshape(-1)
            bad = (~spec.constraint.valid(flat)).nonzero().reshape(-1)
            if len(bad):
                where = int(bad[0])
                value_f = float(flat[where])
                how = ("overflowed its raw value" if not math.isfinite(value_f)
                       else "pushed its raw value so far that it rounds onto a bound")
                raise NonFiniteError(
                    f"{hparams.coordinate_names()[start + where]} = {value_f:.6g} is outside "
                    "its constraint "
                    f"({spec.constraint.describe_valid()}"
                    f"{f'; {len(bad)} entries are' if len(bad) > 1 else ''}): the last outer "
                    f"update {how}"
                )
            self._check_rounded(hparams, name, raw[name], flat, dtypes, start)
            start += flat.numel()

    @staticmethod
    def _check_rounded(hparams: HyperParameters, name: str, raw: Tensor, exact: Tensor,
                       dtypes: Sequence[torch.dtype], start: int) -> None:
        """:meth:`check_values` for the value ``name`` (``exact``: its natural value in
        float64, inside its constraint) read in each training dtype of ``dtypes``."""
        spec = hparams[name]
        for dtype in dtypes:
            if spec.is_discrete or dtype == torch.float64:
                continue
            rounded = spec.constraint.to_natural(raw.detach().to(dtype)).reshape(-1)
            bad = (~spec.constraint.valid(rounded)).nonzero().reshape(-1)
            if len(bad):
                where = int(bad[0])
                dtype_name = str(dtype).removeprefix("torch.")
                raise NonFiniteError(
                    f"{hparams.coordinate_names()[start + where]} = {float(exact[where]):.17g} "
                    f"is outside its constraint ({spec.constraint.describe_valid()}"
                    f"{f'; {len(bad)} entries are' if len(bad) > 1 else ''}) in {dtype_name}, "
                    f"the dtype training computes it in: it rounds to "
                    f"{float(rounded[where]):.6g} there, so training would read the bound")

    def check_losses(self, values: Sequence[float], selection: float | None,
                     untrained: Callable[[], Mapping[str, float]] | None = None) -> None:
        """Raise ``NonFiniteError`` if a loss is absurd (see the module doc). The first call
        sets the references ``L_0``: the mean validation loss and the selection loss; it
        compares them with ``untrained()`` (``{"validation": U, "selection": U_sel}``, the
        untrained model's losses, evaluated only then) first."""
        groups = {"validation": [float(v) for v in values]} if values else {}
        if selection is not None:
            groups["selection"] = [float(selection)]
        for kind, group in groups.items():
            worst = max(group, key=abs)
            reference = self.reference.get(kind)
            if reference is None and untrained is not None:
                self._check_start(kind, worst, untrained().get(kind))
            if reference is None and math.isfinite(worst):
                reference = self.reference[kind] = sum(group) / len(group)
            self._check(kind, worst, reference, "initial loss")

    def check_train_loss(self, loss: float, reference: float | None) -> None:
        """A window that evaluates no validation loss (an online run's plain window after its
        values settled): its mean train loss by the same rule, against ``reference``, the
        mean train loss of the last window that was checked on its validation loss."""
        self._check("train", loss, reference, "last tuned window's loss")

    def _check(self, kind: str, worst: float, reference: float | None, what: str) -> None:
        limit = self.max_loss_ratio * max(abs(reference or 0.0), 1.0)
        if not math.isfinite(worst) or abs(worst) > limit:
            raise NonFiniteError(
                f"the {kind} loss {worst:.3g} is absurd: more than {self.max_loss_ratio:.3g}"
                f" x max(|{what}| {abs(reference or 0.0):.3g}, 1); inner training "
                "has probably diverged"
            )
        if abs(worst) > OVERFLOW_LOSS and math.isfinite(self.max_loss_ratio):
            raise NonFiniteError(
                f"the {kind} loss {worst:.3g} is absurd: above {OVERFLOW_LOSS:.3g}, the "
                "scale of an overflow; inner training has probably diverged")

    def _check_start(self, kind: str, worst: float, untrained: float | None) -> None:
        """The first step's ``worst`` loss of ``kind`` against ``untrained`` (module doc)."""
        ratio = min(START_LOSS_RATIO, self.max_loss_ratio)
        if untrained is None or not math.isfinite(untrained) or math.isinf(self.max_loss_ratio):
            return
        if math.isfinite(worst) and abs(worst) > ratio * max(abs(untrained), 1.0):
            raise NonFiniteError(
                f"the {kind} loss {worst:.3g} is absurd: more than {ratio:.3g} x max(|the "
                f"untrained model's loss| {abs(untrained):.3g}, 1); inner training has "
                "probably diverged"
            )

    def succeeded(self, snapshot: Any) -> None:
        """Remember ``snapshot`` (taken before the successful step) as the last good one."""
        self.good = snapshot
        self.failures = 0

    def failed(self, step: int, reason: str, values: str = "", *, counted: bool = True,
               advice: str = "", row: int = 0) -> tuple[Any, str]:
        """Register a failure; return the snapshot to restore and a log message (``values``:
        the failed step's natural values, named in the message when the start fails;
        ``counted=False``: no cut and no count toward ``max_failures``, module doc;
        ``advice``: what the message advises when the guard gives up, in place of a smaller
        outer step, where the plan knows that one cannot help; ``row``: the failed steps in a
        row, this one and those not counted included, which the message names when they are
        more than the counted ones).

        Raises:
            NonFiniteError: at the first step (nothing good to restore) or after
                ``max_failures`` counted failures in a row.
        """
        self.failures += counted
        self.total_failures += 1
        if self.good is None:
            raise NonFiniteError(
                f"{self.caller}: the initial hyperparameters already fail at step {step}: "
                f"{reason}. Start from safer values{' than ' + values if values else ''} "
                "(e.g. a smaller inner learning rate or fewer inner steps)"
            )
        if self.failures >= self.max_failures:
            reached, self.scale = self.scale, self.scale * self.shrink  # counted: it cuts, as
            uncounted = row - self.failures  # every counted failure does (the state checks)
            limit = option("max_failures", "guard.max_failures")
            before = "" if uncounted < 1 else (
                f", after {uncounted} more failed {'step' if uncounted == 1 else 'steps'} "
                f"at other values before them, which do not count toward {limit}")
            raise NonFiniteError(
                f"{self.caller}: {self.failures} outer steps in a row failed{before} (last at "
                f"step {step}: {reason}), although the outer learning rate was cut to "
                f"{reached:.3g} x its initial value. " + (
                    advice or "Lower the outer learning rate, turn on clipping, or bound the "
                    "hyperparameters that drive training to diverge")
            )
        if not counted:
            return self.good, (f"step {step} failed ({reason}); restored the hyperparameters "
                               "of the last good step")
        self.scale *= self.shrink
        message = (
            f"step {step} failed ({reason}); restored the hyperparameters of the last good "
            f"step and cut the outer learning rate to {self.scale:.3g} x"
        )
        return self.good, message

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "failures": self.failures,
                "total_failures": self.total_failures, "good": self.good,
                "reference": dict(self.reference)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.failures = int(state["failures"])
        self.total_failures = int(state["total_failures"])
        self.good = state["good"]
        self.reference = {k: float(v) for k, v in state.get("reference", {}).items()}


def start_values(hparams: HyperParameters, raw: dict[str, Tensor], limit: int = 6) -> str:
    """The natural values of ``raw`` for a message: ``lr_peak=0.5, wd=0.0001``; a vector as its
    range (``l2=[500 values in 0.001..0.001]``); at most ``limit`` names, then ``...``."""
    parts = []
    for name, value in list(hparams.natural(raw).items())[:limit]:
        flat = value.detach().double().reshape(-1)
        parts.append(f"{name}={float(flat[0]):.3g}" if flat.numel() == 1 else
                     f"{name}=[{flat.numel()} values in {float(flat.min()):.3g}.."
                     f"{float(flat.max()):.3g}]")
    return ", ".join(parts) + (", ..." if len(hparams.raw) > limit else "")


def untrained_loss(problem: Problem, params: Params, buffers: Params, raw: dict[str, Tensor],
                   val_data: list[Batch] | None = None) -> float:
    """The validation loss of the untrained model (``params``, ``buffers``: theta_0; for a
    problem with an initialization hyperparameter theta_0 is its value at ``raw``) at the raw
    values ``raw``, on ``val_data`` (default: the problem's validation batches)."""
    if val_data is not None:
        problem = replace(problem, val_data=val_data)
    hview = problem.hparams.view(problem.raw_tensors(raw))
    with torch.no_grad():
        if problem.initialization is not None:
            params = initial_state(problem, hview, differentiable=False).params
        return float(validation_loss(problem, params, buffers, hview))


def untrained_losses(problems: Sequence[Problem], raw: dict[str, Tensor],
                     val_data: list[Batch] | None, selection: list[Batch] | None
                     ) -> dict[str, float]:
    """The untrained models' mean validation loss over ``problems`` at ``raw`` (on
    ``val_data``, default each problem's), and their mean ``selection`` loss if given: the
    guard's reference for the first step's losses (``{"validation": U, "selection": U_sel}``)."""
    losses = {"validation": [untrained_loss(p, p.params, p.buffers, raw, val_data)
                             for p in problems]}
    if selection is not None:
        losses["selection"] = [untrained_loss(p, p.params, p.buffers, raw, selection)
                               for p in problems]
    return {kind: sum(values) / len(values) for kind, values in losses.items()}


class UntrainedLosses(Mapping[str, float]):
    """:func:`untrained_losses` read lazily: each entry (``"validation"``, and
    ``"selection"`` when ``selection`` is given) is evaluated on its first read, once. An
    online run reads the validation entry at its first window (the rescue's test, the
    guard's start check) and the selection entry only where its first selection loss is
    checked (the last window, when that window is tuned): the untrained model's pass over the
    selection split is not paid at the first window for nothing."""

    def __init__(self, problems: Sequence[Problem], raw: dict[str, Tensor],
                 val_data: list[Batch] | None, selection: list[Batch] | None):
        self._splits = {"validation": val_data, **({} if selection is None
                                                   else {"selection": selection})}
        self._problems, self._raw = problems, raw
        self._read: dict[str, float] = {}

    def __getitem__(self, kind: str) -> float:
        if kind not in self._read:
            data = self._splits[kind]  # KeyError for a kind not given, as a dict's
            values = [untrained_loss(p, p.params, p.buffers, self._raw, data)
                      for p in self._problems]
            self._read[kind] = sum(values) / len(values)
        return self._read[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)
