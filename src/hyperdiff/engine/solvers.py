"""Matrix-free linear solves ``A x = b`` with one signature: ``solver(matvec, b, *, init=None)``.

``matvec(v) = A v`` for flat vectors ``v`` of shape ``(n,)``; ``A`` is never formed except by
:func:`exact`. Constructors configure a :class:`Solver` once:

- :func:`cg`: conjugate gradient for symmetric positive definite ``A`` (Hessians at a
  minimum). Detects breakdown (``p'Ap <= 0``: ``A`` is not positive definite) and reports it.
- :func:`neumann`: the truncated Neumann series ``x = step * sum_{j<J} (I - step A)^j b``,
  run as Richardson iteration ``x <- x + step (b - A x)``; needs ``0 < step < 2 / lambda_max``
  and eigenvalues with positive real part.
- :func:`exact`: the dense ``A`` from ``n`` matvecs (vectorized with ``torch.func.vmap``), then
  ``torch.linalg.solve``; refuses ``n > max_size``.

``damping`` solves ``(A + damping I) x = b`` instead. Every result carries the true relative
residual ``||b - A x|| / ||b||`` (one extra matvec), the iteration count and why it stopped.
Solvers never return NaN silently: breakdown, divergence and singular systems set
``converged=False`` and explain in ``info``, and a :class:`ConvergenceWarning` is emitted
unless ``warn=False``. A matvec that turns a finite vector into NaN or inf (``A`` itself is not
finite) also sets ``matrix_finite=False``, so that callers can refuse the solve. A ``b`` with
NaN or inf entries raises :class:`~hyperdiff.errors.NonFiniteError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hyperdiff.errors import (
    HyperdiffError,
    NonFiniteError,
    describe,
    positive_float,
    positive_int,
)
from hyperdiff.wording import option

CG_KEY, EXACT_KEY = 'method.solver = "cg"', 'method.solver = "exact"'  # in the CLI's advice

MatVec = Callable[[Tensor], Tensor]


class ConvergenceWarning(UserWarning):
    """A linear solve did not converge, or inner training did not reach a stationary point."""


@dataclass(frozen=True)
class SolveResult:
    """Outcome of a linear solve.

    Attributes:
        x: the solution estimate, shape ``(n,)``.
        iterations: iterations run (CG / Neumann steps; ``n`` columns for exact).
        residual: true relative residual ``||b - A x|| / ||b||`` of the (damped) system.
        converged: ``residual <= tol`` and no breakdown, divergence or singularity.
        info: one line saying how it ended.
        matvecs: matrix-vector products used, including the final residual check.
        matrix_finite: ``False`` when a matvec of a finite vector was NaN or inf (or the dense
            ``A`` of :func:`exact` has such entries): ``A`` is not finite, no solve can help.
    """

    x: Tensor
    iterations: int
    residual: float
    converged: bool
    info: str
    matvecs: int = 0
    matrix_finite: bool = True


@dataclass(frozen=True)
class Solver:
    """A configured linear solver: ``solver(matvec, b, *, init=None, warn=True)``.

    ``run`` solves with the matvec already damped by ``options["damping"]`` (if any).
    """

    name: str
    run: Callable[[MatVec, Tensor, Tensor | None], SolveResult] = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self, matvec: MatVec, b: Tensor, *, init: Tensor | None = None, warn: bool = True
    ) -> SolveResult:
        if not isinstance(b, Tensor) or b.dim() != 1 or not b.is_floating_point():
            raise HyperdiffError(
                f"{self.name}: b must be a 1-D floating-point tensor (got {describe(b)})"
            )
        if init is not None and (not isinstance(init, Tensor) or init.shape != b.shape):
            raise HyperdiffError(
                f"{self.name}: init must be a tensor of shape {tuple(b.shape)} "
                f"(got {describe(init)})"
            )
        if init is not None and init.device != b.device:
            raise HyperdiffError(
                f"{self.name}: init must be on b's device {str(b.device)!r} "
                f"(got a tensor on {str(init.device)!r}); move it with init.to(b.device)"
            )
        bad = int((~torch.isfinite(b.detach())).sum())
        if bad:  # the norm is NaN: no solver could stop on its residual, x would be garbage
            raise NonFiniteError(
                f"{self.name}: b must be finite (got {bad} NaN or inf entries of {b.numel()})"
            )
        if float(b.norm()) == 0.0:
            return SolveResult(torch.zeros_like(b), 0, 0.0, True, "b = 0: x = 0", 0)
        matvec = damped(matvec, self.options.get("damping", 0.0))
        low = torch.finfo(b.dtype).bits < 32  # bf16 / fp16: solve in float32, whose tolerance
        if low:  # means something (bf16's default tolerance 0.78 stopped CG at 32% error)
            given = matvec

            def matvec(v: Tensor) -> Tensor:
                return given(v.to(b.dtype)).to(torch.float32)

        work = b.detach().to(torch.float32) if low else b.detach()
        start = None if init is None else init.detach().to(work.dtype)
        result = self.run(matvec, work, start)
        if low:
            result = replace(result, x=result.x.to(b.dtype))
        if warn and not result.converged:
            warnings.warn(f"{self.name}: {result.info}", ConvergenceWarning, stacklevel=2)
        return result

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}({opts})"


def default_tol(dtype: torch.dtype) -> float:
    """``max(1e-7, 100 * eps)``: 1e-7 in float64, 1.2e-5 in float32.

    A relative residual of 1e-7 leaves a hypergradient error of the same order (measured on
    digits, ``benchmarks/implicit.py``), far below the bias of an end point that is not exactly
    stationary; tighter solves cost about 10 more CG iterations per decade.
    """
    return max(1e-7, 100 * torch.finfo(dtype).eps)


def damped(matvec: MatVec, damping: float) -> MatVec:
    """``v -> A v + damping * v``."""
    if damping == 0.0:
        return matvec
    return lambda v: matvec(v) + damping * v


def _relative_residual(matvec: MatVec, b: Tensor, x: Tensor) -> float:
    return float((b - matvec(x)).norm() / b.norm())


NOT_FINITE = "the matrix is not finite"
"""The end of ``info`` where ``matrix_finite`` is ``False``."""


def _maps_finite_to_nonfinite(v: Tensor, av: Tensor) -> bool:
    """Whether ``A v`` has NaN or inf entries although ``v`` has none."""
    return bool(torch.isfinite(v).all()) and not bool(torch.isfinite(av).all())


# Conjugate gradient --------------------------------------------------------------------------
def _cg(matvec: MatVec, b: Tensor, init: Tensor | None, tol: float | None, maxiter: int):
    """CG with residual replacement: on apparent convergence the true residual is recomputed,
    and iteration restarts from it if the recursive one had drifted."""
    tol = default_tol(b.dtype) if tol is None else tol
    bound = tol * float(b.norm())
    x = torch.zeros_like(b) if init is None else init.clone()
    r = b.clone() if init is None else b - matvec(x)
    matvecs = 0 if init is None else 1
    p, rs = r.clone(), float(r @ r)
    info = f"reached maxiter={maxiter}"
    ok = finite = True
    iterations = 0
    if math.sqrt(rs) <= bound:
        maxiter, info = 0, "the initial guess already solves the system"
    for iterations in range(1, maxiter + 1):
        ap = matvec(p)
        matvecs += 1
        curvature = float(p @ ap)
        if not math.isfinite(curvature) or curvature <= 0.0:
            ok = False
            iterations -= 1  # the iterations completed; the breakdown is in the next one's
            done = f"breakdown after {iterations} iteration{'' if iterations == 1 else 's'}"
            info = (
                f"{done}: the next direction's p'Ap = {curvature:.3g} <= 0, the matrix "
                "is not positive definite (a saddle point or maximum?); add damping, or use "
                f"{option('exact()', EXACT_KEY)} for an indefinite system"
            )
            if not math.isfinite(curvature):
                finite = not _maps_finite_to_nonfinite(p, ap)
                info = f"{done}: the next direction's p'Ap = {curvature} is not finite"
                if not finite:
                    info = f"{info}: A p has NaN or inf entries, {NOT_FINITE}"
            break
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = float(r @ r)
        if math.sqrt(rs_new) <= bound:
            r = b - matvec(x)  # residual replacement
            matvecs += 1
            rs_new = float(r @ r)
            if math.sqrt(rs_new) <= bound:
                info = f"converged in {iterations} iterations"
                break
            p = r.clone()
        else:
            p = r + (rs_new / rs) * p
        rs = rs_new
    residual = _relative_residual(matvec, b, x)
    matvecs += 1
    converged = ok and residual <= tol
    if ok and not converged:
        info = f"{info}; relative residual {residual:.3g} > tol {tol:.3g}"
    return SolveResult(x, iterations, residual, converged, info, matvecs, finite)


def cg(tol: float | None = None, maxiter: int = 1000, damping: float = 0.0) -> Solver:
    """Conjugate gradient for a symmetric positive definite ``A + damping I``.

    Stops when the relative residual ``||b - A x|| / ||b|| <= tol``. A non-positive curvature
    ``p'Ap <= 0`` (``A`` not positive definite) stops it with ``converged=False``.

    Args:
        tol: relative residual tolerance (default ``max(1e-7, 100 eps)``: 1e-7 in float64).
        maxiter: maximum number of iterations (one matvec each).
        damping: adds ``damping * I`` to ``A`` (Tikhonov / Levenberg damping), >= 0.

    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> r = cg()(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> r.converged, [round(float(v), 6) for v in r.x]
    (True, [0.090909, 0.636364])
    """
    tol = _optional_tol("cg", tol)
    maxiter = positive_int("cg", "maxiter", maxiter)
    return Solver(
        "cg", lambda matvec, b, init: _cg(matvec, b, init, tol, maxiter),
        {"tol": tol, "maxiter": maxiter, "damping": _damping("cg", damping)},
    )


# Neumann series ------------------------------------------------------------------------------
def _largest_eigenvalue(matvec: MatVec, b: Tensor, iterations: int = 20) -> tuple[float, bool]:
    """Power-iteration estimate of the largest |eigenvalue| of ``A``, started from ``b``, and
    whether every matvec of a finite vector was finite."""
    v = b / b.norm()
    estimate = 0.0
    for _ in range(iterations):
        w = matvec(v)
        if _maps_finite_to_nonfinite(v, w):
            return math.nan, False
        estimate = float(w.norm())
        if not math.isfinite(estimate) or estimate == 0.0:
            break
        v = w / estimate
    return estimate, True


def _neumann_diverged(note: str, done: int, relative: float) -> str:
    return (
        f"{note}diverged after {done} terms (relative residual {relative:.3g}, above the "
        "start's): step must be below 2 / lambda_max and A positive definite; lower step, or "
        f"use {option('exact()', EXACT_KEY)} for an indefinite system (where CG breaks down too)"
    )


def _neumann(matvec, b, init, step, iterations, tol):
    tol = default_tol(b.dtype) if tol is None else tol
    matvecs, note = 0, ""
    if step is None:
        lam, finite = _largest_eigenvalue(matvec, b)
        matvecs += 20
        if not math.isfinite(lam) or lam <= 0.0:
            info = f"cannot choose a step: power iteration gave lambda_max = {lam:.3g}"
            if not finite:
                info = f"{info}: A v has NaN or inf entries, {NOT_FINITE}"
            return SolveResult(torch.zeros_like(b), 0, 1.0, False, info, matvecs, finite)
        step = 1.0 / lam
        note = f"step=1/lambda_max={step:.3g} (power iteration); "
    x = torch.zeros_like(b) if init is None else init.clone()
    b_norm = float(b.norm())
    info = f"{note}ran all {iterations} terms"
    done, first = 0, math.inf
    for done in range(iterations + 1):
        ax = matvec(x)
        matvecs += 1
        if _maps_finite_to_nonfinite(x, ax):
            info = f"{note}A x has NaN or inf entries after {done} terms: {NOT_FINITE}"
            return SolveResult(x, done, math.nan, False, info, matvecs, False)
        r = b - ax
        r_norm = float(r.norm())
        first = r_norm if done == 0 else first
        if not math.isfinite(r_norm) or r_norm > 1e6 * b_norm:
            return SolveResult(x, done, r_norm / b_norm, False,
                               _neumann_diverged(note, done, r_norm / b_norm), matvecs)
        if r_norm <= tol * b_norm:
            info = f"{note}converged after {done} terms"
            break
        if done == iterations:
            break
        x = x + step * r
    residual = r_norm / b_norm
    converged = residual <= tol
    if not converged and done > 0 and r_norm > first:  # the series grew: a step too large
        info = _neumann_diverged(note, done, residual)
    elif not converged:
        info = f"{info}; relative residual {residual:.3g} > tol {tol:.3g}"
    return SolveResult(x, done, residual, converged, info, matvecs)


def neumann(
    step: float | None = None,
    iterations: int = 100,
    *,
    tol: float | None = None,
    damping: float = 0.0,
) -> Solver:
    """Truncated Neumann series ``x_J = step * sum_{j<J} (I - step A)^j b``.

    Computed as Richardson iteration ``x <- x + step (b - A x)`` from ``x = 0``; the error
    shrinks by ``max |1 - step * lambda_i|`` per term, so it converges for a positive definite
    ``A`` when ``0 < step < 2 / lambda_max``, slowly when ``A`` is ill conditioned. Stops early
    once the relative residual is ``<= tol``.

    Args:
        step: the series step (default ``1 / lambda_max`` from 20 power iterations).
        iterations: number of terms ``J`` (one matvec each).
        tol: relative residual for early stopping and ``converged`` (default as :func:`cg`).
        damping: adds ``damping * I`` to ``A``.
    """
    if step is not None:
        step = positive_float("neumann", "step", step)
    iterations = positive_int("neumann", "iterations", iterations)
    tol = _optional_tol("neumann", tol)
    return Solver(
        "neumann", lambda matvec, b, init: _neumann(matvec, b, init, step, iterations, tol),
        {"step": step, "iterations": iterations, "tol": tol,
         "damping": _damping("neumann", damping)},
    )


# Exact dense solve ---------------------------------------------------------------------------
def dense_matrix(matvec: MatVec, n: int, like: Tensor, chunk_size: int) -> tuple[Tensor, str]:
    """``A`` as an ``(n, n)`` tensor from ``n`` matvecs on unit vectors, ``chunk_size`` at a time
    through ``torch.func.vmap`` (a Python loop if ``matvec`` cannot be vmapped)."""
    rows, how = [], f"vmap in chunks of {chunk_size}"
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        units = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
        units[torch.arange(stop - start, device=like.device),
              torch.arange(start, stop, device=like.device)] = 1.0
        try:
            rows.append(torch.func.vmap(matvec)(units))
        except RuntimeError as err:
            how = f"a loop of matvecs (vmap failed: {str(err).splitlines()[0][:80]})"
            rows.append(torch.stack([matvec(u) for u in units]))
    # row i holds A e_i, the i-th column of A
    return torch.cat(rows).T.contiguous(), how


def _exact(matvec, b, init, max_size, chunk_size, tol):
    n = b.numel()
    if n > max_size:
        raise HyperdiffError(
            f"exact: the system size must be at most max_size={max_size} (got {n} unknowns, "
            f"a dense {n}x{n} matrix of {n * n * b.element_size() / 2**20:.0f} MiB); use "
            f"{option('cg()', CG_KEY)} or raise max_size"
        )
    tol = math.sqrt(torch.finfo(b.dtype).eps) if tol is None else tol
    A, how = dense_matrix(matvec, n, b, chunk_size)
    info = f"dense {n}x{n} solve, columns by {how}"
    bad = int((~torch.isfinite(A)).sum())
    if bad:  # linalg.solve would give NaN (or, in lstsq, finite nonsense)
        info = f"{info}: {bad} of its {n * n} entries are NaN or inf, {NOT_FINITE}"
        return SolveResult(torch.full_like(b, math.nan), n, math.nan, False, info, n, False)
    singular = False
    try:
        x = torch.linalg.solve(A, b)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        singular = True
        x = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
        info = f"{info}: the matrix is singular, least-squares solution returned"
    residual = float((b - A @ x).norm() / b.norm()) if torch.isfinite(x).all() else math.inf
    converged = not singular and residual <= tol
    if not singular and not converged:
        info = f"{info}; relative residual {residual:.3g} > tol {tol:.3g} (ill conditioned)"
    return SolveResult(x, n, residual, converged, info, n)


def exact(
    max_size: int = 10_000,
    *,
    chunk_size: int = 256,
    tol: float | None = None,
    damping: float = 0.0,
) -> Solver:
    """Form ``A`` densely (``n`` matvecs, vmapped) and solve with ``torch.linalg.solve``.

    Cost ``n`` matvecs plus ``O(n^3)``, memory ``O(n^2)``; for small problems and as a
    reference. Works for any non-singular ``A`` (indefinite or non-symmetric).

    Args:
        max_size: refuse systems with more unknowns (``HyperdiffError``).
        chunk_size: unit vectors pushed through ``matvec`` per vmapped call.
        tol: relative residual above which the result is flagged not converged
            (default ``sqrt(eps)``: 1.5e-8 in float64).
        damping: adds ``damping * I`` to ``A``.
    """
    max_size = positive_int("exact", "max_size", max_size)
    chunk_size = positive_int("exact", "chunk_size", chunk_size)
    tol = _optional_tol("exact", tol)
    return Solver(
        "exact", lambda matvec, b, init: _exact(matvec, b, init, max_size, chunk_size, tol),
        {"max_size": max_size, "chunk_size": chunk_size, "tol": tol,
         "damping": _damping("exact", damping)},
    )


def _optional_tol(caller: str, tol: float | None) -> float | None:
    """``tol`` checked to be a number in ``(0, 1)``; ``None`` (the dtype's default) kept.

    A relative residual of 1 is met by ``x = 0``: ``tol >= 1`` would accept it as a solution.
    """
    if tol is None:
        return None
    checked = positive_float(caller, "tol", tol)
    if checked >= 1.0:
        raise HyperdiffError(
            f"{caller}: tol must be below 1, the relative residual ||b - A x|| / ||b|| of "
            f"x = 0 (got {describe(tol)})"
        )
    return checked


def _damping(caller: str, damping: Any) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise HyperdiffError(
            f"{caller}: damping must be a non-negative finite number (got {describe(damping)})"
        )
    if not math.isfinite(damping) or damping < 0:
        raise HyperdiffError(
            f"{caller}: damping must be a non-negative finite number (got {damping})"
        )
    return float(damping)


__all__ = ["ConvergenceWarning", "SolveResult", "Solver", "cg", "damped", "exact", "neumann"]
