"""Linear solvers against torch.linalg.solve on small dense float64 systems."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from hyperdiff.engine.solvers import ConvergenceWarning, SolveResult, cg, exact, neumann
from hyperdiff.errors import HyperdiffError

D = torch.float64


def spd(n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """A symmetric positive definite matrix with eigenvalues spread over [1, cond]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=D)
    return q @ torch.diag(eig) @ q.T


def rhs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=D)


def true_residual(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    return float((b - a @ x).norm() / b.norm())


@pytest.mark.parametrize("solver", [cg(tol=1e-11), exact()], ids=["cg", "exact"])
def test_solvers_match_dense_solve(solver):
    a, b = spd(40, 1e3), rhs(40)
    reference = torch.linalg.solve(a, b)
    result = solver(lambda v: a @ v, b)
    assert isinstance(result, SolveResult) and result.converged
    assert float((result.x - reference).norm() / reference.norm()) <= 1e-8
    assert result.residual == pytest.approx(true_residual(a, b, result.x), rel=1e-6, abs=1e-15)
    assert result.residual <= 1e-10


def test_cg_iterations_and_default_tolerance():
    a, b = spd(60, 1e2), rhs(60)
    result = cg(tol=1e-10)(lambda v: a @ v, b)
    # bound: residual <= 2 sqrt(kappa) rho^k, rho = (sqrt(kappa) - 1) / (sqrt(kappa) + 1)
    rho = (10.0 - 1.0) / (10.0 + 1.0)
    bound = math.ceil(math.log(2 * 10.0 / 1e-10) / -math.log(rho))
    assert result.converged and 0 < result.iterations <= bound
    assert true_residual(a, b, result.x) <= 1e-10
    loose = cg(tol=1e-3)(lambda v: a @ v, b)
    assert loose.iterations < result.iterations
    assert 1e-12 < loose.residual <= 1e-3
    default = cg()(lambda v: a @ v, b)  # tol 1e-7 in float64
    assert default.converged and loose.iterations < default.iterations < result.iterations
    assert 1e-10 < true_residual(a, b, default.x) <= 1e-7


@pytest.mark.parametrize("solver_fn", [cg, exact, neumann], ids=["cg", "exact", "neumann"])
def test_damping_solves_the_shifted_system(solver_fn):
    a, b = spd(20, 10.0), rhs(20)
    kwargs = {"damping": 0.5} | ({"iterations": 400} if solver_fn is neumann else {})
    kwargs |= {} if solver_fn is exact else {"tol": 1e-12}
    result = solver_fn(**kwargs)(lambda v: a @ v, b)
    reference = torch.linalg.solve(a + 0.5 * torch.eye(20, dtype=D), b)
    assert float((result.x - reference).norm() / reference.norm()) <= 1e-8


def test_neumann_error_falls_with_iterations():
    a, b = spd(30, 20.0), rhs(30)
    reference = torch.linalg.solve(a, b)
    step = 1.0 / float(torch.linalg.eigvalsh(a)[-1])
    errors = []
    for iterations in (5, 20, 80, 400):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            x = neumann(step=step, iterations=iterations, tol=1e-14)(lambda v: a @ v, b).x
        errors.append(float((x - reference).norm() / reference.norm()))
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] <= 1e-8
    # default step (power iteration) converges too
    auto = neumann(iterations=2000)(lambda v: a @ v, b)
    assert auto.converged and "power iteration" in auto.info


def test_neumann_step_too_large_is_reported_as_divergence():
    a, b = spd(10, 10.0), rhs(10)
    with pytest.warns(ConvergenceWarning, match="diverged"):
        result = neumann(step=5.0, iterations=200)(lambda v: a @ v, b)
    assert not result.converged
    assert torch.isfinite(result.x).all()


def test_cg_breakdown_on_indefinite_matrix_is_reported_not_nan():
    a = spd(20, 10.0) - 5.0 * torch.eye(20, dtype=D)  # eigenvalues in [-4, 5]
    b = rhs(20)
    with pytest.warns(ConvergenceWarning, match="not positive definite"):
        result = cg()(lambda v: a @ v, b)
    assert not result.converged
    assert "breakdown" in result.info
    assert torch.isfinite(result.x).all()
    assert result.residual == pytest.approx(true_residual(a, b, result.x), rel=1e-6)
    # the exact solve handles the same (non-singular, indefinite) system
    assert exact()(lambda v: a @ v, b).converged


def test_cg_not_converging_warns_with_residual():
    a, b = spd(50, 1e4), rhs(50)
    with pytest.warns(ConvergenceWarning, match=r"maxiter=3.*relative residual"):
        result = cg(maxiter=3)(lambda v: a @ v, b)
    assert not result.converged and result.iterations == 3
    assert result.residual == pytest.approx(true_residual(a, b, result.x), rel=1e-6)
    assert result.residual > 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cg(maxiter=3)(lambda v: a @ v, b, warn=False)


def test_cg_with_exact_initial_guess_stops_at_once():
    a, b = spd(15, 10.0), rhs(15)
    x = torch.linalg.solve(a, b)
    result = cg()(lambda v: a @ v, b, init=x)
    assert result.converged and result.iterations == 0


def test_zero_right_hand_side_gives_zero():
    a = spd(5, 2.0)
    for solver in (cg(), neumann(), exact()):
        result = solver(lambda v: a @ v, torch.zeros(5, dtype=D))
        assert result.converged and float(result.x.abs().max()) == 0.0


def test_exact_refuses_large_systems():
    with pytest.raises(HyperdiffError, match=r"exact: the system size must be at most max_size=10"):
        exact(max_size=10)(lambda v: v, rhs(11))


def test_exact_singular_system_is_reported():
    a = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=D))
    with pytest.warns(ConvergenceWarning, match="singular"):
        result = exact()(lambda v: a @ v, torch.tensor([1.0, 1.0, 1.0], dtype=D))
    assert not result.converged and torch.isfinite(result.x).all()


def test_exact_falls_back_to_a_loop_when_matvec_cannot_be_vmapped():
    a, b = spd(8, 5.0), rhs(8)

    def matvec(v):  # .item() cannot run under vmap
        return torch.stack([(row @ v).reshape(()) * 1.0 for row in a]) + 0.0 * float(v[0].item())

    result = exact()(matvec, b)
    assert "loop" in result.info
    assert float((result.x - torch.linalg.solve(a, b)).norm()) <= 1e-10


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: cg(tol=0.0), "cg: tol must be a positive finite number"),
        (lambda: cg(maxiter=0), "cg: maxiter must be a positive int"),
        (lambda: cg(damping=-1.0), "cg: damping must be a non-negative finite number"),
        (lambda: neumann(step=-0.1), "neumann: step must be a positive finite number"),
        (lambda: neumann(iterations=1.5), "neumann: iterations must be a positive int"),
        (lambda: exact(max_size=0), "exact: max_size must be a positive int"),
    ],
)
def test_bad_options(make, message):
    with pytest.raises(HyperdiffError, match=message):
        make()


def test_bad_right_hand_side():
    with pytest.raises(HyperdiffError, match="cg: b must be a 1-D floating-point tensor"):
        cg()(lambda v: v, torch.ones(2, 2, dtype=D))
    with pytest.raises(HyperdiffError, match=r"cg: init must be a tensor of shape \(3,\)"):
        cg()(lambda v: v, torch.ones(3, dtype=D), init=torch.ones(2, dtype=D))
