"""The finite-difference reference of :func:`hyperdiff.diagnose.check.check`, with its own error.

Central differences ``q_i(h) = (L(u + s e_i) - L(u - s e_i)) / 2s`` with ``s = h max(1, |u_i|)``
at three relative steps ``h = 10 h0, h0, h0 / 10`` (``h0`` the cube root of the dtype's machine
epsilon: 6.1e-6 in float64). For a loss that is smooth at the scale of the steps,
``q_i(h) = g_i + c_i h^2 + O(eps |L| / h)``, and the three quotients agree to the truncation and
rounding error of ``q_i(h0)``, the reported value. Its error is estimated by their spread

    e_i = max_j |q_i(h_j) - q_i(h0)|,

which bounds both (it holds ``99 c_i h0^2`` from the largest step and ten times the rounding
noise of ``h0`` from the smallest). Where the loss is not smooth at that scale (a ReLU or a
BatchNorm batch statistic whose pattern changes between the evaluations, randomness that is
not replayed), the quotients disagree and ``e_i`` is large.

Each entry ``m_i`` of a method is classified against the reference ``r`` (``C`` coordinates)
with the tolerance ``tau = tolerance ||r||`` and the reference's own threshold ``rho =
reliable_within ||r||`` (``rho = tau`` unless given: a float64 reference of a float32 problem
is trusted to the float32 differences' accuracy while the method is held to its own rounding):

    e_i > rho                  ->  "unreliable"   (the reference cannot tell; not the method)
    |m_i - r_i| <= tau + e_i   ->  "ok"           (agrees within the reference's error)
    otherwise                  ->  "disagrees"    (off by more than the reference's error)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hyperdiff.engine.problem import Problem
from hyperdiff.errors import NonFiniteError
from hyperdiff.methods.base import HyperGradient
from hyperdiff.methods.finite_difference import finite_difference

STEP_FACTORS = (10.0, 1.0, 0.1)  # multiples of h0; the middle one is reported
OK, UNRELIABLE, DISAGREES = "ok", "unreliable", "disagrees"


@dataclass(frozen=True)
class Reference:
    """Central differences at several steps on ``C`` coordinates.

    Attributes:
        result: the finite-difference hypergradient at the middle step ``h0``.
        steps: the relative steps ``h`` (largest first), length ``S``.
        quotients: ``(S, C)`` difference quotients, one row per step.
        error: ``(C,)`` estimated absolute error of the reported value (:func:`spread`).
    """

    result: HyperGradient
    steps: tuple[float, ...]
    quotients: Tensor
    error: Tensor

    @property
    def value(self) -> Tensor:
        """``(C,)`` the reported value: the quotients at ``h0``."""
        return self.quotients[STEP_FACTORS.index(1.0)]

    def relative_error(self) -> float:
        """``||e|| / ||r||`` over the coordinates (``inf`` for a zero reference)."""
        scale = float(self.value.norm())
        return float(self.error.norm()) / scale if scale > 0 else math.inf


def spread(quotients: Tensor, middle: int) -> Tensor:
    """``(C,)`` largest distance of any step's quotient from row ``middle`` of ``(S, C)``.

    >>> spread(torch.tensor([[1.0, 2.0], [1.5, 2.0], [0.5, 2.25]]), 1).tolist()
    [1.0, 0.25]
    """
    return (quotients - quotients[middle]).abs().amax(dim=0)


def multi_step_reference(problem: Problem, coordinates: list[int]) -> Reference:
    """Finite differences of ``problem`` on ``coordinates`` at every step of
    :data:`STEP_FACTORS` (``2 C + 1`` trainings each) and their spread. A step other than
    ``h0`` whose losses are not finite (training diverges, a log leaves its domain) gives
    infinite quotients: the reference is then unreliable there, not the check failed."""
    h0 = torch.finfo(problem.dtype).eps ** (1 / 3)
    steps = tuple(h0 * factor for factor in STEP_FACTORS)
    middle = STEP_FACTORS.index(1.0)
    result = finite_difference(steps[middle], coordinates=coordinates, warn=False)(problem)
    rows = []
    for j, h in enumerate(steps):
        if j == middle:
            rows.append(result.vector[coordinates].to(torch.float64))
            continue
        try:
            other = finite_difference(h, coordinates=coordinates, warn=False)(problem)
            rows.append(other.vector[coordinates].to(torch.float64))
        except NonFiniteError:
            rows.append(torch.full((len(coordinates),), math.inf, dtype=torch.float64,
                                   device=result.vector.device))
    quotients = torch.stack(rows)
    return Reference(result, steps, quotients, spread(quotients, middle))


def classify(method: Tensor, reference: Tensor, error: Tensor, tolerance: float,
             reliable_within: float | None = None) -> list[str]:
    """Each entry of ``method`` (``(C,)``) against ``reference`` with its ``error``: ``"ok"``,
    ``"unreliable"`` or ``"disagrees"`` (see the module doc; ``reliable_within`` defaults to
    ``tolerance``).

    >>> classify(torch.tensor([1.0, 5.0, 2.0]), torch.tensor([1.0, 2.0, 2.0]),
    ...          torch.tensor([0.0, 0.0, 2.0]), 1e-6)
    ['ok', 'disagrees', 'unreliable']
    """
    allowed = _allowed(reference, tolerance)
    trusted = allowed if reliable_within is None else _allowed(reference, reliable_within)
    labels = []
    for m, r, e in zip(method.tolist(), reference.tolist(), error.tolist(), strict=True):
        if e > trusted:
            labels.append(UNRELIABLE)
        else:
            labels.append(OK if abs(m - r) <= allowed + e else DISAGREES)
    return labels


def reliable(reference: Tensor, error: Tensor, tolerance: float) -> list[bool]:
    """Per entry: is the reference's estimated error within ``tolerance ||r||``?"""
    allowed = _allowed(reference, tolerance)
    return [e <= allowed for e in error.tolist()]


def _allowed(reference: Tensor, tolerance: float) -> float:
    """``tolerance ||r||``; ``tolerance`` itself (absolute) for a zero reference."""
    scale = float(reference.norm())
    return tolerance * scale if scale > 0 else tolerance
