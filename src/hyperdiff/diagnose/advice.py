"""Which hypergradient method to use, from the problem's size and, if given, measurements.

Cost models, with ``k`` hyperparameters, ``P`` parameters, ``T`` inner steps, in units of one
plain training step (time) and bytes (memory, ``b`` bytes per value):

=====================  ======================  ===========================  ==================
method                 time                    memory                       applies when
=====================  ======================  ===========================  ==================
reverse                ``3 T``                 ``4 T P b`` (the tape)       always
forward                ``T (1 + 2 k)``         ``3 (k + 1) P b`` (tangents)  always
implicit               ``T + 2 min(P, 300)``   ``8 P b`` (one HVP graph)    training converged
checkpointed           ``4 T``                 ``8 sqrt(T) P b``            always
reversible             ``8 T``                 ``4 P b + T P / 50``         SGD with momentum
truncated(T/10)        ``T + 0.3 T``           ``0.4 T P b``                biased; last resort
finite_difference      ``(2 k + 1) T``         ``2 P b``                    reference only
=====================  ======================  ===========================  ==================

These are rough (activations are not counted; a Hessian-vector product costs about two
steps; CG takes at most a few hundred of them), good enough to rank methods that differ by
orders of magnitude. The table :data:`CANDIDATES` is the single place to add a method
(truncated, checkpointed, reversible reverse modes): one :class:`Candidate` row each.

With ``measured`` numbers (from :func:`hyperdiff.diagnose.check.check`), the fastest method whose
measured relative error is within ``tolerance`` and whose peak memory fits wins instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from hyperdiff.errors import HyperdiffError, positive_float, positive_int


class Size(NamedTuple):
    """What the cost models see."""

    num_hparams: int
    num_params: int
    steps: int
    bytes_per_value: int
    converged: bool | None
    optimizer: str | None = None


@dataclass(frozen=True)
class Candidate:
    """One method in the table: cost models and when it applies.

    ``applies(size)`` returns ``None`` when the method is usable, else the reason it is not.
    ``reference`` methods (finite differences) are never recommended; inexact ones
    (truncated) only when no exact method fits in memory.
    """

    name: str
    time: Callable[[Size], float]
    memory: Callable[[Size], float]
    applies: Callable[[Size], str | None] = lambda size: None
    reference: bool = False
    exact: bool = True


@dataclass(frozen=True)
class Advice:
    """The recommended method name and why."""

    method: str
    reason: str

    def __str__(self) -> str:
        return f"{self.method}: {self.reason}"


def _implicit_applies(size: Size) -> str | None:
    if size.converged is None:
        return ("unknown whether training converged (recommend(..., converged=True) if it "
                "reaches a stationary point)")
    if not size.converged:
        return "training did not reach a stationary point"
    return None


def optimizer_kind(optimizer: Any) -> str:
    """``"sgd_momentum"`` for heavy-ball SGD, ``"sgd_nesterov"`` for Nesterov's, else the
    optimizer's name (for ``recommend``)."""
    coefs = getattr(optimizer, "coefficients", {})
    name = getattr(optimizer, "name", str(optimizer))
    momentum = coefs.get("momentum", 0.0)
    if name == "sgd" and not (isinstance(momentum, (int, float)) and momentum == 0):
        nesterov = getattr(optimizer, "settings", {}).get("nesterov", False)
        return "sgd_nesterov" if nesterov else "sgd_momentum"
    return name


def _reversible_applies(size: Size) -> str | None:
    if size.optimizer is None:
        return ("needs hd.sgd with heavy-ball momentum (recommend(..., "
                "optimizer='sgd_momentum') when training uses it)")
    if size.optimizer != "sgd_momentum":
        return f"needs hd.sgd with heavy-ball momentum (got {size.optimizer})"
    return None


CANDIDATES: tuple[Candidate, ...] = (
    Candidate(
        "reverse",
        time=lambda s: 3.0 * s.steps,
        memory=lambda s: 4.0 * s.steps * s.num_params * s.bytes_per_value,
    ),
    Candidate(
        "forward",
        time=lambda s: s.steps * (1.0 + 2.0 * s.num_hparams),
        memory=lambda s: 3.0 * (s.num_hparams + 1) * s.num_params * s.bytes_per_value,
    ),
    Candidate(
        "implicit",
        time=lambda s: s.steps + 2.0 * min(s.num_params, 300),
        memory=lambda s: 8.0 * s.num_params * s.bytes_per_value,
        applies=_implicit_applies,
    ),
    Candidate(
        "checkpointed",
        time=lambda s: 4.0 * s.steps,
        memory=lambda s: 8.0 * s.steps**0.5 * s.num_params * s.bytes_per_value,
    ),
    Candidate(
        "reversible",
        time=lambda s: 8.0 * s.steps,
        memory=lambda s: 4.0 * s.num_params * s.bytes_per_value + s.steps * s.num_params / 50,
        applies=_reversible_applies,
    ),
    Candidate(
        "truncated",
        time=lambda s: 1.3 * s.steps,
        memory=lambda s: 0.4 * s.steps * s.num_params * s.bytes_per_value,
        exact=False,
    ),
    Candidate(
        "finite_difference",
        time=lambda s: (2.0 * s.num_hparams + 1.0) * s.steps,
        memory=lambda s: 2.0 * s.num_params * s.bytes_per_value,
        reference=True,
    ),
)


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


def base_name(label: str) -> str:
    """``"implicit(cg)"`` -> ``"implicit"``."""
    return label.split("(", 1)[0]


def _from_measurements(
    measured: Mapping[str, Mapping[str, Any]],
    memory_bytes: float | None,
    tolerance: float,
    allowed: set[str],
) -> Advice | None:
    rows = []
    for label, m in measured.items():
        error, seconds = m.get("rel_error"), m.get("time_s")
        if error is None or seconds is None or base_name(label) not in allowed:
            continue
        if not error <= tolerance:
            continue
        peak = m.get("peak_bytes")
        if memory_bytes is not None and peak is not None and peak > memory_bytes:
            continue
        rows.append((seconds, label, error))
    if not rows:
        return None
    rows.sort()
    seconds, label, error = rows[0]
    others = ", ".join(f"{lab} {sec:.3g} s" for sec, lab, _ in rows[1:])
    reason = (
        f"fastest accurate method measured: {seconds:.3g} s, relative error {error:.2g} "
        f"(<= {tolerance:g})" + (f"; also accurate: {others}" if others else "")
    )
    return Advice(label, reason)


def recommend(
    num_hparams: int,
    num_params: int,
    steps: int,
    *,
    memory_bytes: float | None = None,
    converged: bool | None = None,
    measured: Mapping[str, Mapping[str, Any]] | None = None,
    bytes_per_value: int = 4,
    optimizer: str | None = None,
    tolerance: float = 1e-4,
    candidates: Sequence[Candidate] = CANDIDATES,
    unavailable: Mapping[str, str] | None = None,
) -> Advice:
    """Recommend a hypergradient method.

    Args:
        num_hparams, num_params, steps: ``k``, ``P`` and ``T``.
        memory_bytes: memory budget; methods estimated (or measured) above it are excluded.
        converged: whether training reaches a stationary point (implicit needs it).
        measured: ``{label: {"rel_error": e, "time_s": t, "peak_bytes": m}}`` per method;
            when some method is accurate, the measurements decide.
        bytes_per_value: 4 (float32) or 8 (float64), for the memory models.
        optimizer: ``"sgd_momentum"``, ``"sgd"``, ``"adam"``, ... (reversible needs the first).
        tolerance: largest acceptable measured relative error.
        candidates: the table of methods (default :data:`CANDIDATES`).
        unavailable: ``{name: reason}`` for methods the caller knows do not apply (e.g. a
            model with buffers), reported like the candidates' own reasons.

    >>> recommend(10, 10_000, 100).method
    'reverse'
    >>> recommend(1, 10_000, 100).method  # as fast, far less memory
    'forward'
    >>> recommend(1000, 10_000, 50_000, converged=True).method
    'implicit'
    >>> recommend(100, 100_000, 1000, memory_bytes=2**30).method  # the tape would not fit
    'checkpointed'
    >>> recommend(100, 100_000, 100_000, memory_bytes=2**29, optimizer="sgd_momentum").method
    'reversible'
    """
    size = Size(
        positive_int("recommend", "num_hparams", num_hparams),
        positive_int("recommend", "num_params", num_params),
        positive_int("recommend", "steps", steps),
        positive_int("recommend", "bytes_per_value", bytes_per_value),
        converged,
        optimizer,
    )
    if memory_bytes is not None:
        memory_bytes = positive_float("recommend", "memory_bytes", memory_bytes)
    reasons = dict(unavailable or {})

    def why_not(c: Candidate) -> str | None:
        return reasons.get(c.name) or c.applies(size)

    usable = [c for c in candidates if not c.reference and why_not(c) is None]
    if not usable:
        raise HyperdiffError("recommend: candidates must include a usable method (got none)")
    if measured:
        advice = _from_measurements(measured, memory_bytes, tolerance, {c.name for c in usable})
        if advice is not None:
            return advice
    fits = [c for c in usable if memory_bytes is None or c.memory(size) <= memory_bytes]
    if any(c.exact for c in fits):
        fits = [c for c in fits if c.exact]
    if not fits:
        best = min(usable, key=lambda c: c.memory(size))
        return Advice(
            best.name,
            f"no method fits in {_mib(memory_bytes or 0)}; {best.name} needs the least "
            f"(about {_mib(best.memory(size))})",
        )
    ranked = sorted(fits, key=lambda c: (c.time(size), c.memory(size)))
    best = ranked[0]
    parts = [f"k={size.num_hparams}, P={size.num_params}, T={size.steps}"]
    parts.append(f"estimated {best.time(size):.3g} step-equivalents and {_mib(best.memory(size))}")
    if len(ranked) > 1:
        parts.append("vs " + ", ".join(f"{c.name} {c.time(size):.3g}" for c in ranked[1:]))
    skipped = [
        f"{c.name} ({why_not(c)})" for c in candidates if not c.reference and why_not(c) is not None
    ]
    too_big = [c.name for c in usable
               if memory_bytes is not None and c.memory(size) > memory_bytes]
    if too_big:
        parts.append(f"over the memory budget: {', '.join(too_big)}")
    if skipped:
        parts.append(f"not applicable: {', '.join(skipped)}")
    return Advice(best.name, "; ".join(parts))
