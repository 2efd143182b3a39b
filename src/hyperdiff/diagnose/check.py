"""Hypergradient check: every applicable method against central finite differences.

:func:`check` computes the hypergradient of a problem with each applicable method (reverse;
forward when ``k <= forward_limit``; implicit with CG; implicit with the exact solve when
``P <= exact_limit``; first-order MAML and Reptile when theta_0 is a hyperparameter,
``hd.initialization``, reported as approximations with their error; plus any methods passed
in) and with central finite differences on a few random flat coordinates, then reports per
method the relative error on those coordinates,

    ||g_method[c] - g_fd[c]|| / ||g_fd[c]||,

the wall time and the peak memory, and recommends a method
(:func:`hyperdiff.diagnose.advice.recommend`). Finite differences differentiate the same T-step
training as reverse and forward, so the implicit rows also measure the bias of stopping training at
T. For a float32 (or lower) problem they run on a float64 copy
(:func:`hyperdiff.engine.precision.in_float64`): in float32 their own rounding noise (``eps |L| /
h``, often tens of percent of the hypergradient) would be the error measured. When the copy fails (a
model that keeps float32 constants, or a loss that casts to lower precision, e.g. ``.float()``,
so that the copy would not compute in float64), they run in the problem's dtype and the report
says why.

**The verdict.** The reference is taken at three steps and its error estimated from their
spread (:mod:`hyperdiff.diagnose.reference`); each method's entries are classified as agreeing
within that error, disagreeing by more, or unresolved where the reference itself is
unreliable (its steps disagree by more than the tolerance: a loss that is not smooth at that
scale, such as ReLU kinks or BatchNorm batch statistics; the tolerance there is
:func:`_tolerance` of the problem's dtype). A method agrees within the tolerance of the
reference actually used (:func:`_agreement_tolerance`) plus the reference's error: 1e-6 for a
float64 problem, ``100 eps`` of the problem's dtype (1.2e-5 in float32, at most 1%) for the
float64 reference of a lower-precision problem (the method's own rounding), and the finite
differences' accuracy in that dtype (:func:`_tolerance`) where the reference itself had to run
in it. A method of a lower-precision problem that disagrees with the float64 reference is run
again on the float64 copy: where it agrees there, its row reads ``"rounding"`` (the problem's
own rounding, amplified by its training, is the gap, not the method) and the recommendation
counts its error there. A partial method (``finite_difference(coordinates=[...])``) is judged
on the coordinates it computed only (the others read ``"not computed"``) and never
recommended. :attr:`CheckReport.verdict` states it in one line; the recommendation uses only
the reliable entries.

**Peak memory** counts torch's own allocations: on CUDA ``torch.cuda.max_memory_allocated``;
on the CPU each method runs once under ``torch.profiler`` with ``profile_memory=True``, whose
allocator events (bytes allocated and freed, in order, read from the profiler's public Chrome
trace export) are summed into a running total; the peak is its maximum above the level at the
start. ``tracemalloc`` cannot see these (they are C++ allocations), and the process RSS
mixes in the allocator's caching. Each method then runs a second time without the profiler for
the timing (the first run also warms it up). The first profiler start in a process takes
several seconds; ``memory=False`` skips the profiled runs and warms up with one inner step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.diagnose.advice import CANDIDATES, Advice, base_name, recommend
from hyperdiff.diagnose.reference import (
    DISAGREES,
    UNRELIABLE,
    Reference,
    classify,
    multi_step_reference,
)
from hyperdiff.diagnose.reference import reliable as reliable_entries
from hyperdiff.engine.precision import LowerPrecisionError, in_float64
from hyperdiff.engine.problem import Problem
from hyperdiff.engine.solvers import ConvergenceWarning, cg, exact
from hyperdiff.errors import (
    HyperdiffError,
    describe,
    nonnegative_int,
    positive_float,
    positive_int,
)
from hyperdiff.logs import get_logger
from hyperdiff.methods.base import HyperGradient, Method
from hyperdiff.methods.finite_difference import CostWarning
from hyperdiff.methods.fomaml import fomaml
from hyperdiff.methods.forward import forward
from hyperdiff.methods.implicit import implicit
from hyperdiff.methods.reptile import reptile
from hyperdiff.methods.reverse import reverse

_LOG = get_logger("check")


REFERENCE = "finite_difference"
"""The reference row's label, reserved: a finite-difference method passed in ``methods`` is
labelled by its ``repr`` and judged like any other."""

NOT_COMPUTED = "not computed"
"""A partial method's entry for a coordinate it did not compute (not judged)."""

FIRST_ORDER = ("fomaml", "reptile")
"""Methods that drop the Jacobian of training by design: their rows report the error as their
bias ("approximation"), never as a disagreement, and they are not recommended."""


@dataclass(frozen=True)
class CheckRow:
    """One method's line: relative error vs finite differences, time, peak memory, notes, and
    per reference entry ``"ok"``, ``"unreliable"`` or ``"disagrees"``
    (:func:`hyperdiff.diagnose.reference.classify`), or ``"not computed"`` where a partial
    method did not compute it."""

    label: str
    rel_error: float
    time_s: float
    peak_bytes: int | None
    notes: str = ""
    failed: bool = False
    entries: tuple[str, ...] = ()
    approximation: bool = False
    rounding: bool = False  # it disagrees, and the same method on the float64 copy agrees

    @property
    def verdict(self) -> str:
        """``"agrees"``, ``"disagrees"`` (some entry off by more than the reference's error),
        ``"rounding"`` (it disagrees, but the same method on the problem's float64 copy
        agrees: the gap is the problem's own rounding, not the method), ``"ref. unreliable"``
        (none disagrees, some the reference cannot tell), ``"approximation"`` (a first-order
        meta-gradient, :data:`FIRST_ORDER`: its error is its bias by design), ``"not
        computed"`` (a partial method that computed none of the compared entries) or
        ``"failed"``."""
        if self.failed:
            return "failed"
        if self.entries and all(e == NOT_COMPUTED for e in self.entries):
            return NOT_COMPUTED
        if self.approximation:
            return "approximation"
        if DISAGREES in self.entries:
            return "rounding" if self.rounding else "disagrees"
        return "ref. unreliable" if UNRELIABLE in self.entries else "agrees"


@dataclass(frozen=True)
class CheckReport:
    """Result of :func:`check`: :meth:`table`, :attr:`verdict` and :attr:`recommendation`.

    ``reference`` holds the finite-difference quotients at the middle step, ``reference_error``
    their estimated error per coordinate (the spread over ``reference_steps``, whose quotients
    are ``reference_quotients``), ``reference_reliable`` whether it is within the tolerance and
    ``reference_noise`` its norm relative to the reference's.
    """

    rows: list[CheckRow]
    coordinates: list[int]
    coordinate_names: list[str]
    reference: list[float]
    num_hparams: int
    num_params: int
    steps: int
    advice: Advice
    results: dict[str, HyperGradient] = field(default_factory=dict, repr=False)
    reference_dtype: str = "float64"
    reference_noise: float | None = None
    reference_source: str = "the problem"
    reference_steps: list[float] = field(default_factory=list)
    reference_quotients: list[list[float]] = field(default_factory=list)
    reference_error: list[float] = field(default_factory=list)
    reference_reliable: list[bool] = field(default_factory=list)
    float64_check: str = ""  # the method rerun on the float64 copy, and its relative error

    @property
    def recommendation(self) -> str:
        return str(self.advice)

    @property
    def verdict(self) -> str:
        """One line: which methods agree with the reference, which disagree by more than its
        error, and for which entries the reference itself is unreliable."""
        methods = [r for r in self.rows if r.label != REFERENCE]
        agree = [r.label for r in methods if r.verdict in ("agrees", "ref. unreliable")]
        disagree = [r.label for r in methods if r.verdict == "disagrees"]
        rounding = [r.label for r in methods if r.verdict == "rounding"]
        failed = [r.label for r in methods if r.failed]
        approximations = [f"{r.label} {r.rel_error:.2g}" for r in methods
                          if r.verdict == "approximation"]
        unreliable = [i for i, ok in enumerate(self.reference_reliable) if not ok]
        parts = []
        if agree and len(unreliable) < len(self.reference_reliable):
            parts.append(f"{', '.join(agree)} agree with the reference " + (
                "where it is reliable" if unreliable
                else f"(estimated error {self.reference_noise or 0.0:.2g} of its norm)"))
        if disagree:
            parts.append(f"{', '.join(disagree)} disagree with the reference by more than its "
                         "estimated error (see rel. error)")
        if rounding:
            parts.append(
                f"{', '.join(rounding)} differ from the float64 reference by more than its "
                f"error, but {self.float64_check}: the gap is the problem's own rounding in "
                "its dtype (amplified by the training, e.g. Adam on a parameter whose gradient "
                "is rounding noise, such as a bias before BatchNorm), not the methods; tune in "
                "float64 where that matters")
        if unreliable:
            values = ", ".join(
                f"{self.coordinate_names[i]} {self.reference[i]:.6g} +- "
                f"{self.reference_error[i]:.2g}" for i in unreliable)
            causes = "".join((
                "a step's losses were not finite, or "
                if any(math.isinf(self.reference_error[i]) for i in unreliable) else "",
                "" if self.reference_dtype == "float64"
                else f"rounding noise of {self.reference_dtype} differences, or "))
            parts.append(
                f"reference unreliable for these entries: {values} (its steps disagree by more "
                f"than the tolerance: {causes}a loss that is not smooth in them at the steps' "
                "scale, e.g. ReLU kinks or BatchNorm batch statistics), so no method is blamed "
                "there")
        if approximations:
            parts.append("approximations by design, their relative error: "
                         + ", ".join(approximations))
        if failed:
            parts.append(f"failed: {', '.join(failed)}")
        return "verdict: " + "; ".join(parts)

    def table(self) -> str:
        """A plain-text table: method, relative error, time, peak memory, notes."""
        head = ("method", "rel. error", "verdict", "time (s)", "peak MiB", "notes")
        lines = [head]
        for r in self.rows:
            is_reference = r.label == REFERENCE
            error = (
                "reference"
                if is_reference
                else ("failed" if r.failed else "-" if math.isnan(r.rel_error)
                      else f"{r.rel_error:.2e}")
            )
            verdict = "-" if is_reference else r.verdict
            peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.3g}"
            lines.append((r.label, error, verdict, f"{r.time_s:.3g}", peak, r.notes))
        widths = [max(len(line[i]) for line in lines) for i in range(5)]
        text = [
            "  ".join(cell.ljust(w) for cell, w in zip(line[:5], widths, strict=True))
            + ("  " + line[5] if line[5] else "")
            for line in lines
        ]
        text.insert(1, "-" * len(text[0]))
        names = ", ".join(self.coordinate_names)
        summary = (
            f"k={self.num_hparams} hyperparameters, P={self.num_params} parameters, "
            f"T={self.steps} steps; finite differences on {len(self.coordinates)} "
            f"coordinates: {names}"
        )
        steps = ", ".join(f"{h:.2g}" for h in self.reference_steps)
        report = [
            summary, *text,
            f"reference: central differences in {self.reference_dtype} on "
            f"{self.reference_source} at steps h = {steps}; their spread estimates its error "
            f"at {self.reference_noise or 0.0:.2g} of its norm"
            + ("" if self.reference_dtype == "float64" else ", so smaller errors are not measured"),
            self.verdict,
        ]
        return "\n".join(report)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's start/stop lines from C++)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None
                ) -> tuple[Any, int]:
    """Run ``fn()`` and return its result and the peak of torch's allocations (bytes) above
    the level at the start.

    On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On the
    CPU: ``torch.profiler`` with ``profile_memory=True``, whose allocator events (bytes
    allocated and freed, in order) come from its public Chrome trace export and are summed into
    a running total; the peak is its maximum.
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        result = fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        with _quiet_stderr():
            prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as file:
            events = json.load(file).get("traceEvents", [])
    allocations = sorted(
        (e["ts"], e["args"].get("Bytes", 0)) for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    )
    current = peak = 0
    for _, nbytes in allocations:  # > 0 allocates, < 0 frees
        current += nbytes
        peak = max(peak, current)
    return result, peak


def _run(method: Method, problem: Problem, memory: bool):
    """(result or None, seconds, peak bytes or None, notes, failed)."""
    notes: list[str] = []
    peak = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if memory:
                _, peak = peak_memory(lambda: method(problem), problem.device)
            else:
                _warm_up(method, problem)
            started = time.perf_counter()
            result = method(problem)
            seconds = time.perf_counter() - started
        except (HyperdiffError, FloatingPointError, RuntimeError) as err:
            return None, math.nan, peak, f"failed: {str(err).splitlines()[0][:120]}", True
    for w in caught:
        if not issubclass(w.category, (ConvergenceWarning, CostWarning)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        text = str(w.message).split(": ", 1)[-1].split(";")[0]
        if text not in notes:
            notes.append(text)
    return result, seconds, peak, "; ".join(notes), False


def _computed(result: HyperGradient, coords: list[int]) -> list[bool]:
    """Per compared coordinate: did the method compute it? A partial method lists those it
    did in ``diagnostics["coordinates"]`` (``finite_difference(coordinates=...)``)."""
    listed = result.diagnostics.get("coordinates")
    if not isinstance(listed, (list, tuple)):
        return [True] * len(coords)
    done = set(listed)
    return [c in done for c in coords]


def _entries(values: Tensor, ref: Tensor, error: Tensor, tolerance: tuple[float, float],
             computed: list[bool]) -> tuple[str, ...]:
    """:func:`~hyperdiff.diagnose.reference.classify` on the computed entries (against the
    whole reference's norm, as for a complete method), :data:`NOT_COMPUTED` on the others;
    ``tolerance`` is (agreement, the reference's reliability)."""
    done = torch.tensor(computed, dtype=torch.bool, device=ref.device)
    labels = classify(torch.where(done, values, ref), ref, error, *tolerance)
    return tuple(label if ok else NOT_COMPUTED for label, ok in zip(labels, computed, strict=True))


def _warm_up(method: Method, problem: Problem) -> None:
    """One inner step, silently: lazy initialisation of torch.func and the allocator."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method(problem.with_steps(1))


def default_methods(
    problem: Problem, *, forward_limit: int = 64, exact_limit: int = 2000
) -> dict[str, Method]:
    """The applicable methods by label (see the module doc)."""
    methods = {"reverse": reverse()}
    if problem.hparams.numel <= forward_limit:
        methods["forward"] = forward()
    if not problem.buffers:
        methods["implicit(cg)"] = implicit(cg())
        if problem.num_params <= exact_limit:
            methods["implicit(exact)"] = implicit(exact())
    if problem.initialization is not None:  # theta_0 tuned: the first-order meta-gradients
        methods["fomaml"] = fomaml()
        methods["reptile"] = reptile()
    return methods


def _label(method: Method, taken: dict[str, Method]) -> str:
    """The method's row label: its name (with the solver for implicit), else its ``repr`` where
    that is taken or is the reference's (:data:`REFERENCE`), numbered where that is taken too."""
    label = method.name
    if method.name == "implicit":
        label = f"implicit({method.options['solver'].name})"
    if label not in taken and label != REFERENCE:
        return label
    label = unique = repr(method)
    number = 2
    while unique in taken or unique == REFERENCE:
        unique, number = f"{label} #{number}", number + 1
    return unique


def check(
    problem: Problem,
    *,
    methods: Sequence[Method] | Method | None = None,
    coordinates: int = 3,
    seed: int = 0,
    memory: bool = True,
    memory_bytes: float | None = None,
    progress: bool | None = False,
) -> CheckReport:
    """Compare every applicable hypergradient method with central finite differences.

    Args:
        problem: a :class:`~hyperdiff.Problem` (``hd.make_problem(...)``).
        methods: methods to add to the default set (reverse, forward, implicit CG/exact):
            one method or a sequence of them.
        coordinates: number of random flat hyperparameter coordinates for finite
            differences (all of them if the problem has fewer).
        seed: picks the coordinates.
        memory: also measure peak memory (one extra profiled run per method).
        memory_bytes: memory budget passed to the recommendation.
        progress: a tqdm bar over the methods (``None``: only on a terminal).

    Returns a :class:`CheckReport`: ``print(report.table())``, ``report.recommendation``.
    """
    if not isinstance(problem, Problem):
        raise HyperdiffError(
            f"check: problem must be a hyperdiff Problem (got {type(problem).__name__})"
        )
    coordinates = positive_int("check", "coordinates", coordinates)
    if not isinstance(memory, bool):
        raise HyperdiffError(f"check: memory must be True or False (got {describe(memory)})")
    if progress is not None and not isinstance(progress, bool):
        raise HyperdiffError(
            f"check: progress must be True, False or None (got {describe(progress)})"
        )
    seed = nonnegative_int("check", "seed", seed)
    if memory_bytes is not None:
        memory_bytes = positive_float("check", "memory_bytes", memory_bytes)
    chosen = default_methods(problem)
    for method in _given(methods):
        chosen[_label(method, chosen)] = method
    k = problem.hparams.numel
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(k, generator=generator, device="cpu")  # host ints: coordinates
    coords = sorted(picked[: min(coordinates, k)].tolist())

    from tqdm.auto import tqdm

    bar = tqdm(total=len(chosen) + 1, unit="method", desc="check", leave=True,
               disable=None if progress is None else not progress)
    started = time.perf_counter()
    bar.set_postfix_str(REFERENCE)
    reference, reference_dtype, source = _reference(problem, coords)
    bar.update(1)
    fd_seconds = time.perf_counter() - started
    ref = reference.value
    # the method is held to its own rounding, the reference trusted to its dtype's accuracy
    tolerance = _agreement_tolerance(problem, reference_dtype)
    reliability = _tolerance(problem.dtype)
    trusted = reliable_entries(ref, reference.error, reliability)
    candidates = {c.name for c in CANDIDATES}

    rows, results, measured = [], {REFERENCE: reference.result}, {}
    converged = None
    for label, method in chosen.items():
        bar.set_postfix_str(label)
        result, seconds, peak, notes, failed = _run(method, problem, memory)
        bar.update(1)
        error = math.nan
        entries: tuple[str, ...] = ()
        if result is not None:
            results[label] = result
            values = result.vector[coords].detach().to(torch.float64)
            computed = _computed(result, coords)
            if any(computed):
                error = _relative(values, ref, computed)
            if not all(computed):  # a partial method: judged where it computed
                names = problem.hparams.coordinate_names()
                missing = ", ".join(names[c] for c, done in zip(coords, computed, strict=True)
                                    if not done)
                notes = "; ".join(filter(None, (notes, f"not computed: {missing}")))
            entries = _entries(values, ref, reference.error, (tolerance, reliability), computed)
            # first-order methods are reported, not recommended; partial ones and methods that
            # name no candidate of the advice neither
            if (any(trusted) and method.name not in FIRST_ORDER and all(computed)
                    and base_name(label) in candidates):
                measured[label] = {"rel_error": _relative(values, ref, trusted),
                                   "time_s": seconds, "peak_bytes": peak}
            if label.startswith("implicit"):
                stationary = bool(result.diagnostics.get("stationary", False))
                converged = stationary if converged is None else converged and stationary
        rows.append(CheckRow(label, error, seconds, peak, notes, failed, entries,
                             approximation=method.name in FIRST_ORDER))
    rows, float64_check, copy_errors = _rounding_rows(rows, chosen, problem, reference_dtype,
                                                      coords, ref, reference.error,
                                                      (tolerance, reliability))
    for label, copy_error in copy_errors.items():  # accurate methods, off by the dtype alone
        if label in measured and any(trusted):
            measured[label]["rel_error"] = _relative(copy_error, ref, trusted)
    bar.set_description_str("check done")  # the bar stays on screen as the phase's summary
    bar.set_postfix_str(f"{len(chosen)} methods against finite differences", refresh=False)
    bar.close()
    rows.append(
        CheckRow(
            REFERENCE, math.nan, fd_seconds, None,
            f"{len(reference.steps) * (2 * len(coords) + 1)} trainings",
        )
    )
    advice = recommend(
        k,
        problem.num_params,
        problem.steps,
        memory_bytes=memory_bytes,
        converged=converged,
        measured=measured,
        bytes_per_value=torch.finfo(problem.dtype).bits // 8,
        optimizer=problem.optimizer,
        unavailable=_unavailable(problem, chosen, converged),
        # agreement within the tolerance plus the reference's own error on its reliable entries
        tolerance=tolerance + (_relative(ref + reference.error, ref, trusted)
                               if any(trusted) else 0.0),
    )
    on_copy = [label for label in copy_errors if label in measured]
    if on_copy and "measured" in advice.reason:
        advice = replace(advice, reason=f"{advice.reason}; errors of {', '.join(on_copy)} "
                         "measured on the float64 copy (see the verdict: in "
                         f"{_dtype_name(problem)} the problem's own rounding adds more)")
    names = problem.hparams.coordinate_names()
    return CheckReport(
        rows,
        coords,
        [names[i] for i in coords],
        ref.tolist(),
        k,
        problem.num_params,
        problem.steps,
        advice,
        results,
        reference_dtype,
        reference.relative_error(),
        source,
        list(reference.steps),
        reference.quotients.tolist(),
        reference.error.tolist(),
        trusted,
        float64_check,
    )


def _rounding_rows(rows: list[CheckRow], chosen: dict[str, Method], problem: Problem,
                   reference_dtype: str, coords: list[int], ref: Tensor, error: Tensor,
                   tolerance: tuple[float, float]
                   ) -> tuple[list[CheckRow], str, dict[str, Tensor]]:
    """Where exact methods disagree with a float64 reference of a lower-precision problem, run
    each of them on the float64 copy: one that agrees there disagrees by the problem's own
    rounding (``"rounding"``), not by the method; one that disagrees there too stays blamed.
    The reruns' warnings are kept out of the output (as :func:`_run` does; the row's notes
    already hold the problem's own). Returns the rows, what the reruns found (``""``: none
    agreed) and, for the methods that agree there, their values on the copy."""
    if problem.dtype == torch.float64 or reference_dtype != "float64":
        return rows, "", {}
    found, out, copy = [], [], None
    agreeing: dict[str, Tensor] = {}
    for row in rows:
        if row.verdict != "disagrees":
            out.append(row)
            continue
        try:
            copy = in_float64(problem) if copy is None else copy
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = chosen[row.label](copy)
            for w in caught:
                if not issubclass(w.category, (ConvergenceWarning, CostWarning)):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            values = result.vector[coords].detach().to(torch.float64)
        except (HyperdiffError, FloatingPointError, RuntimeError, TypeError) as err:
            _LOG.info("check: %s on a float64 copy failed (%s)", row.label,
                      str(err).splitlines()[0][:120])
            out.append(row)
            continue
        computed = _computed(result, coords)
        agrees = DISAGREES not in _entries(values, ref, error, tolerance, computed)
        out.append(replace(row, rounding=agrees))
        if agrees:
            agreeing[row.label] = values
            found.append(f"{row.label} {_relative(values, ref, computed):.2g}")
    return out, ("" if not found else "on the float64 copy the same methods agree with it "
                 f"(rel. error {', '.join(found)})"), agreeing


def _given(methods: Any) -> list[Method]:
    """``check``'s ``methods``: one method or a sequence of them, else the standard error."""
    if methods is None:
        return []
    if isinstance(methods, Method):
        return [methods]
    listed: list[Any] = [methods] if isinstance(methods, (str, bytes)) or not isinstance(
        methods, Iterable) else list(methods)
    for method in listed:
        if not isinstance(method, Method):
            raise HyperdiffError(
                "check: methods must be a hyperdiff method or a sequence of them, e.g. "
                f"[hd.truncated(10)] (got {describe(method)}, a {type(method).__name__})")
    return listed


def _unavailable(problem: Problem, chosen: dict[str, Method], converged: bool | None
                 ) -> dict[str, str]:
    """Why implicit and reversible do not apply, as far as this check knows: a model with
    buffers (both refuse them), or implicit runs that all failed."""
    if problem.buffers:
        reason = "the model has buffers (BatchNorm statistics); hd.checkpointed() takes them"
        return {"implicit": reason, "reversible": reason}
    if converged is None and any(label.startswith("implicit") for label in chosen):
        return {"implicit": "its runs failed in this check (see the table)"}
    return {}


def _relative(values: Tensor, reference: Tensor, mask: list[bool]) -> float:
    """``||v[m] - r[m]|| / ||r[m]||`` over the entries where ``mask`` holds."""
    keep = torch.tensor(mask, dtype=torch.bool, device=reference.device)
    diff, scale = float((values[keep] - reference[keep]).norm()), float(reference[keep].norm())
    return diff / scale if scale > 0 else diff


def _reference(problem: Problem, coords: list[int]) -> tuple[Reference, str, str]:
    """The multi-step finite-difference reference on ``coords``
    (:func:`~hyperdiff.diagnose.reference.multi_step_reference`): in float64 (on a float64 copy of
    a lower-precision problem, see :mod:`hyperdiff.engine.precision`), else in the problem's dtype.

    Returns the reference, its dtype name and what it differentiated (for the report).
    """
    if problem.dtype == torch.float64:
        return multi_step_reference(problem, coords), "float64", "the problem"
    why = "the float64 copy failed"
    try:
        reference = multi_step_reference(in_float64(problem), coords)
        return reference, "float64", "a float64 copy of the problem"
    except LowerPrecisionError as err:  # the copy would not compute in float64: say so
        why = str(err)
        _LOG.info("check: %s; using %s", why, problem.dtype)
    except (HyperdiffError, FloatingPointError, RuntimeError, TypeError) as err:
        _LOG.info("check: finite differences on a float64 copy failed (%s); using %s",
                  str(err).splitlines()[0][:120], problem.dtype)
    return multi_step_reference(problem, coords), _dtype_name(problem), f"the problem ({why})"


def _dtype_name(problem: Problem) -> str:
    """``"float32"`` for a float32 problem."""
    return str(problem.dtype).removeprefix("torch.")


def _agreement_tolerance(problem: Problem, reference_dtype: str) -> float:
    """Error accepted as agreement with the reference actually used: with a float64 reference
    of a lower-precision problem, the compared method's own rounding in the problem's dtype,
    ``100 eps`` (1.2e-5 in float32; at most 1%, as :func:`_tolerance`): a larger gap that the
    float64 rerun closes reads "rounding" (:func:`_rounding_rows`), one it does not is the
    method's. A reference in the problem's own dtype (float64, or the copy failed):
    :func:`_tolerance` of that dtype."""
    if problem.dtype == torch.float64 or reference_dtype != "float64":
        return _tolerance(problem.dtype)
    return min(0.01, max(1e-6, 100 * torch.finfo(problem.dtype).eps))


def _tolerance(dtype: torch.dtype) -> float:
    """Error accepted as agreement with finite differences: 1e-6 in float64,
    2.4e-3 in float32: finite differences are accurate to about eps^(2/3)); at most 1% (the
    formula gives 98% in float16 and 394% in bfloat16, which took a 103% error for agreement:
    a larger gap there is judged by the float64 rerun, "rounding" where the copy agrees)."""
    return min(0.01, max(1e-6, 100 * torch.finfo(dtype).eps ** (2 / 3)))
