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
measured relative error is within ``tolerance`` and whose peak memory (its cost model's where
none was measured) fits wins instead; an inexact one (truncated) only where no exact one is
accurate. An inexact recommendation says it is biased and gives the call (``hd.truncated(T/10)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from hyperdiff.engine.optimizers import Optimizer
from hyperdiff.errors import HyperdiffError, fail, is_number, positive_float, positive_int


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
    (truncated) only when no exact method fits in memory (or is measured accurate). ``call``
    gives the configured call to recommend for an inexact one (``"hd.truncated(30)"``).
    """

    name: str
    time: Callable[[Size], float]
    memory: Callable[[Size], float]
    applies: Callable[[Size], str | None] = lambda size: None
    reference: bool = False
    exact: bool = True
    call: Callable[[Size], str] | None = None


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


OPTIMIZER_KINDS = ("sgd", "sgd_momentum", "sgd_nesterov", "adam", "adamw")
"""What ``recommend(optimizer=...)`` takes as a string (an :class:`Optimizer` gives its own)."""


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
        call=lambda s: f"hd.truncated({_truncated_k(s)})",
    ),
    Candidate(
        "finite_difference",
        time=lambda s: (2.0 * s.num_hparams + 1.0) * s.steps,
        memory=lambda s: 2.0 * s.num_params * s.bytes_per_value,
        reference=True,
    ),
)


def _truncated_k(size: Size) -> int:
    """The ``k`` of the truncated cost model: the last ``T/10`` steps (at least one)."""
    return max(1, size.steps // 10)


def _biased(c: Candidate, size: Size) -> str:
    """What an inexact candidate's recommendation says first: biased, and the call."""
    call = c.call(size) if c.call is not None else c.name
    if c.name == "truncated":
        return (f"biased: {call} differentiates only the last {_truncated_k(size)} of the "
                f"T={size.steps} steps (it drops how the earlier steps depend on the "
                "hyperparameters)")
    return f"biased: {call} is an approximation"


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


def base_name(label: str) -> str:
    """``"implicit(cg)"`` -> ``"implicit"``."""
    return label.split("(", 1)[0]


def _from_measurements(
    measured: Mapping[str, Mapping[str, Any]],
    memory_bytes: float | None,
    tolerance: float,
    usable: Mapping[str, Candidate],
    size: Size,
) -> Advice | None:
    """The fastest measured method within ``tolerance`` whose peak memory fits (the cost
    model's where no peak was measured); exact methods first, an inexact one only where no
    exact one qualifies."""
    rows = []
    for label, m in measured.items():
        error, seconds = m.get("rel_error"), m.get("time_s")
        candidate = usable.get(base_name(label))
        if error is None or seconds is None or candidate is None:
            continue
        if not error <= tolerance:
            continue
        peak = m.get("peak_bytes")
        if peak is None:
            peak = candidate.memory(size)
        if memory_bytes is not None and peak > memory_bytes:
            continue
        rows.append((not candidate.exact, seconds, label, error))
    if not rows:
        return None
    if any(not inexact for inexact, *_ in rows):
        rows = [row for row in rows if not row[0]]
    rows.sort()
    inexact, seconds, label, error = rows[0]
    others = ", ".join(f"{lab} {sec:.3g} s" for _, sec, lab, _ in rows[1:])
    reason = (
        f"fastest accurate method measured: {seconds:.3g} s, relative error {error:.2g} "
        f"(<= {tolerance:g})" + (f"; also accurate: {others}" if others else "")
    )
    if inexact:
        reason += ("; biased by design (its bias is within the tolerance on this problem; no "
                   "exact method measured was accurate and within the memory budget)")
    return Advice(label, reason)


MEASUREMENT_KEYS = ("rel_error", "time_s", "peak_bytes")


def _checked_measurements(measured: Any, candidates: Sequence[Candidate]
                          ) -> Mapping[str, Mapping[str, Any]]:
    """``measured`` as given, else the standard error: a dict label -> {rel_error, time_s[,
    peak_bytes]} of non-negative finite numbers (peak_bytes also None), each label naming a
    candidate (``"implicit(cg)"`` names ``"implicit"``)."""
    if not isinstance(measured, Mapping):
        raise fail("recommend", "measured", "a dict {label: {'rel_error': e, 'time_s': t, "
                   "'peak_bytes': m}}", measured)
    names = [c.name for c in candidates]
    for label, m in measured.items():
        if not isinstance(label, str) or base_name(label) not in names:
            raise fail("recommend", "measured's keys", f"method labels naming one of {names} "
                       "(e.g. 'reverse', 'implicit(cg)')", label)
        if not isinstance(m, Mapping) or not {"rel_error", "time_s"} <= set(m) or any(
                key not in MEASUREMENT_KEYS for key in m):
            raise fail("recommend", f"measured[{label!r}]", "a dict with 'rel_error' and "
                       "'time_s' (and optionally 'peak_bytes')", m)
        for key in MEASUREMENT_KEYS:
            value: Any = m.get(key)
            if key == "peak_bytes" and value is None:
                continue
            if not is_number(value) or not 0 <= value < float("inf"):
                raise fail("recommend", f"measured[{label!r}][{key!r}]",
                           "a non-negative finite number" + (
                               " or None" if key == "peak_bytes" else ""), value)
    return measured


def _checked_optimizer(optimizer: Any) -> str | None:
    """The optimizer's kind: an :class:`Optimizer`'s (:func:`optimizer_kind`), a known kind
    string, or None; else the standard error."""
    if optimizer is None:
        return None
    if isinstance(optimizer, Optimizer):
        return optimizer_kind(optimizer)
    if isinstance(optimizer, str) and optimizer in OPTIMIZER_KINDS:
        return optimizer
    raise fail("recommend", "optimizer", f"None, an optimizer such as hd.sgd(0.1, momentum=0.9), "
               f"or one of {list(OPTIMIZER_KINDS)}", optimizer)


def recommend(
    num_hparams: int,
    num_params: int,
    steps: int,
    *,
    memory_bytes: float | None = None,
    converged: bool | None = None,
    measured: Mapping[str, Mapping[str, Any]] | None = None,
    bytes_per_value: int = 4,
    optimizer: str | Optimizer | None = None,
    tolerance: float = 1e-4,
    candidates: Sequence[Candidate] = CANDIDATES,
    unavailable: Mapping[str, str] | None = None,
) -> Advice:
    """Recommend a hypergradient method.

    Args:
        num_hparams, num_params, steps: ``k``, ``P`` and ``T``.
        memory_bytes: memory budget; methods estimated (or measured) above it are excluded.
        converged: whether training reaches a stationary point (implicit needs it): True,
            False or None (unknown).
        measured: ``{label: {"rel_error": e, "time_s": t, "peak_bytes": m}}`` per method
            (``peak_bytes`` optional: the cost model's memory where missing or None), each
            label naming a candidate; when some method is accurate, the measurements decide.
        bytes_per_value: 4 (float32) or 8 (float64), for the memory models.
        optimizer: the inner optimizer (``hd.sgd(0.1, momentum=0.9)``), or its kind, one of
            :data:`OPTIMIZER_KINDS` (``"sgd_momentum"``, ``"sgd"``, ``"adam"``, ...;
            reversible needs the first).
        tolerance: largest acceptable measured relative error, a positive finite number.
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
        _checked_optimizer(optimizer),
    )
    if converged is not None and not isinstance(converged, bool):
        raise fail("recommend", "converged", "True, False or None (unknown)", converged)
    tolerance = positive_float("recommend", "tolerance", tolerance)
    if measured is not None:
        measured = _checked_measurements(measured, candidates)
    if memory_bytes is not None:
        memory_bytes = positive_float("recommend", "memory_bytes", memory_bytes)
    reasons = dict(unavailable or {})

    def why_not(c: Candidate) -> str | None:
        return reasons.get(c.name) or c.applies(size)

    usable = [c for c in candidates if not c.reference and why_not(c) is None]
    if not usable:
        raise HyperdiffError("recommend: candidates must include a usable method (got none)")
    if measured:
        advice = _from_measurements(measured, memory_bytes, tolerance,
                                    {c.name: c for c in usable}, size)
        if advice is not None:
            return advice
    fits = [c for c in usable if memory_bytes is None or c.memory(size) <= memory_bytes]
    if any(c.exact for c in fits):
        fits = [c for c in fits if c.exact]
    if not fits:
        best = min(usable, key=lambda c: c.memory(size))
        return Advice(
            best.name,
            ("" if best.exact else _biased(best, size) + "; ")
            + f"no method fits in {_mib(memory_bytes or 0)}; {best.name} needs the least "
            f"(about {_mib(best.memory(size))})",
        )
    ranked = sorted(fits, key=lambda c: (c.time(size), c.memory(size)))
    best = ranked[0]
    parts = [] if best.exact else [
        _biased(best, size) + "; no exact method applies within the memory budget"]
    parts.append(f"k={size.num_hparams} hyperparameters, P={size.num_params}, T={size.steps}")
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
