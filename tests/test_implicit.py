"""Implicit differentiation against closed forms, finite differences of converged solves and
long unrolls (float64)."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import hyperdiff as hd
from hyperdiff.engine.solvers import ConvergenceWarning, cg, exact, neumann
from hyperdiff.methods.implicit import implicit
from hyperdiff.testing.linear import (
    load_dataset,
    logistic,
    ridge,
    ridge_hypergradient,
    ridge_solution,
)

from conftest import synthetic_regression

D = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


synthetic = synthetic_regression


def closed_form(lp, data):
    """Exact natural-unit hypergradient of a ridge LinearProblem at its current values."""
    nat = lp.hparams.natural()
    lam = nat.get("l2", torch.tensor(lp.fixed_l2, dtype=D))
    answer = ridge_hypergradient(*data, lam, nat.get("sample_weight"))
    name = "sample_weight" if "sample_weight" in nat else "l2"
    return name, answer.grad_sample_weight if name == "sample_weight" else answer.grad_l2


@pytest.mark.parametrize("which", ["scalar", "per_feature", "per_sample"])
def test_ridge_trained_to_convergence_matches_closed_form(which):
    data = synthetic()
    lp = ridge(data, regularization=which, l2=2.0)
    problem = lp.problem(steps=100)
    name, expected = closed_form(lp, data)
    by_exact = implicit(exact())(problem)
    by_cg = implicit(cg())(problem)
    assert rel(by_exact.grad_natural[name], expected) <= 1e-8
    assert rel(by_cg.grad_natural[name], expected) <= 1e-6
    d = by_cg.diagnostics
    assert d["converged"] and d["stationary"] and d["residual"] <= 1e-10
    assert d["form"] == "stationary" and d["iterations"] >= 1


def test_ridge_ill_conditioned_warm_start_matches_closed_form():
    data = load_dataset("diabetes")
    lp = ridge(data, regularization="per_feature", l2=0.5)
    w_star = ridge_solution(data.x_train, data.y_train, torch.full((10,), 0.5, dtype=D))
    problem = lp.problem(steps=1, params={"w": w_star})
    _, expected = closed_form(lp, data)
    assert rel(implicit(exact())(problem).grad_natural["l2"], expected) <= 1e-8
    result = implicit(cg())(problem)
    assert rel(result.grad_natural["l2"], expected) <= 1e-6
    assert result.diagnostics["converged"]


def test_neumann_converges_when_the_step_is_small_enough():
    data = synthetic()
    lp = ridge(data, regularization="per_feature", l2=2.0)
    problem = lp.problem(steps=100)
    _, expected = closed_form(lp, data)
    step = 1.0 / lp.smoothness()
    errors = []
    for iterations in (3, 10, 30, 120):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = implicit(neumann(step=step, iterations=iterations, tol=1e-12))(problem)
        errors.append(rel(result.grad_natural["l2"], expected))
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[-1] <= 1e-8
    with pytest.warns(ConvergenceWarning, match="diverged"):
        bad = implicit(neumann(step=5.0 * step, iterations=200))(problem)
    assert not bad.diagnostics["converged"]


def _newton_value(lp, raw_l2, init):
    theta = lp.solve({"l2": raw_l2}, init=init)
    return float(lp.val_loss(theta, None, lp.val_data))


def test_logistic_breast_cancer_agrees_with_converged_finite_differences_and_reverse():
    lp = logistic(load_dataset("breast_cancer"), regularization="per_feature", l2=1.0)
    theta = lp.solve()
    implicit_problem = lp.problem(steps=1, params=theta)
    by_cg = implicit(cg())(implicit_problem).grad["l2"]
    by_exact = implicit(exact())(implicit_problem).grad["l2"]
    assert by_cg.shape == (30,)

    # central differences of a fully converged (Newton) inner solve: all 30 coordinates
    # through three random directions, and eight single coordinates
    raw = lp.hparams.raw["l2"]
    h = 1e-5
    g = torch.Generator().manual_seed(0)
    directions = [torch.randn(30, generator=g, dtype=D) for _ in range(3)]
    directions += [torch.eye(30, dtype=D)[i] for i in torch.randperm(30, generator=g)[:8]]
    for u in directions:
        u = u / u.norm()
        fd = (_newton_value(lp, raw + h * u, theta) - _newton_value(lp, raw - h * u, theta)) / (
            2 * h
        )
        scale = float(by_exact.norm())
        assert abs(float(by_exact @ u) - fd) <= 1e-5 * scale
        assert abs(float(by_cg @ u) - fd) <= 1e-5 * scale

    # reverse mode through a long unroll of heavy-ball GD started at theta*, whose tangents
    # converge to d theta*/d lam (rate (sqrt(kappa)-1)/(sqrt(kappa)+1) per step)
    def loss(v):
        return lp.full_train_loss({"w": v[:30], "b": v[30]})

    eig = torch.linalg.eigvalsh(
        torch.autograd.functional.hessian(loss, torch.cat([theta["w"], theta["b"][None]]))
    )
    big, small = math.sqrt(float(eig[-1])), math.sqrt(float(eig[0]))
    optimizer = hd.sgd(4 / (big + small) ** 2, ((big - small) / (big + small)) ** 2)
    unrolled = hd.reverse()(lp.problem(optimizer, steps=150, params=theta)).grad["l2"]
    assert rel(unrolled, by_exact) <= 1e-5
    assert rel(by_cg, by_exact) <= 1e-6


def test_fixed_point_form_equals_stationary_form_with_momentum():
    data = synthetic()
    lp = ridge(data, regularization="per_feature", l2=2.0)
    problem = lp.problem(hd.sgd(0.5 / lp.smoothness(), momentum=0.5), steps=150)
    _, expected = closed_form(lp, data)
    stationary = implicit(cg())(problem).grad_natural["l2"]
    fixed = implicit(cg(), fixed_point=True)(problem)
    assert fixed.diagnostics["form"] == "fixed_point" and fixed.diagnostics["converged"]
    assert rel(fixed.grad_natural["l2"], stationary) <= 1e-8
    assert rel(fixed.grad_natural["l2"], expected) <= 1e-8
    by_exact = implicit(exact(), fixed_point=True)(problem).grad_natural["l2"]
    assert rel(by_exact, expected) <= 1e-8


def test_fixed_point_form_differentiates_optimizer_weight_decay():
    x, y, x_val, y_val = data = synthetic()
    n = x.shape[0]

    def train_loss(params, hparams, batch):
        xb, yb = batch
        return 0.5 * ((xb @ params["w"] - yb) ** 2).mean()

    hparams = hd.HyperParameters(wd=hd.scalar(0.02))
    problem = hd.make_problem(
        train_loss,
        train_loss,
        hparams,
        {"w": torch.zeros(6, dtype=D)},
        optimizer=hd.sgd(0.5, weight_decay="wd"),
        train_data=(x, y),
        val_data=(x_val, y_val),
        steps=120,
    )
    # fixed point: X'(Xw - y)/n + wd w = 0, i.e. ridge with l2 = n * wd
    expected = n * ridge_hypergradient(*data, torch.tensor(n * 0.02, dtype=D)).grad_l2
    for solver in (cg(), exact()):
        result = implicit(solver, fixed_point=True)(problem)
        assert rel(result.grad_natural["wd"], expected) <= 1e-8
        assert result.diagnostics["stationary"]
    with pytest.warns(ConvergenceWarning, match="fixed_point=True"):
        implicit(cg())(problem)


def test_fixed_point_form_with_adam_and_exact_solve():
    data = synthetic()
    lp = ridge(data, regularization="per_feature", l2=2.0)
    w_star = lp.solve()
    # Adam is locally stable at the minimiser only when eps dominates sqrt(v) there (with a
    # tiny eps it amplifies rounding-level gradients into lr-sized steps and never settles)
    problem = lp.problem(hd.adam(0.05, eps=1.0), steps=20, params=w_star)
    _, expected = closed_form(lp, data)
    result = implicit(exact(), fixed_point=True)(problem)
    assert result.diagnostics["stationary"]
    assert rel(result.grad_natural["l2"], expected) <= 1e-8


def test_cg_breakdown_on_saddle_point_is_reported_and_exact_still_works():
    a = torch.tensor([1.0, -2.0, 3.0], dtype=D)  # indefinite curvature: a saddle point
    b = torch.tensor([1.0, 1.0, 1.0], dtype=D)
    target = torch.tensor([0.0, 1.0, 0.0], dtype=D)

    def train_loss(params, hparams, batch):
        w = params["w"]
        return 0.5 * (w * (a + hparams["lam"]) * w).sum() - b @ w

    def val_loss(params, hparams, batch):
        return 0.5 * ((params["w"] - target) ** 2).sum()

    lam = 0.5
    w_star = b / (a + lam)  # gradient zero: a stationary saddle point
    problem = hd.make_problem(
        train_loss,
        val_loss,
        hd.HyperParameters(lam=hd.scalar(lam)),
        {"w": w_star},
        optimizer=hd.sgd(1e-3),
        train_data=torch.zeros(1, dtype=D),
        val_data=torch.zeros(1, dtype=D),
        steps=1,
    )
    with pytest.warns(ConvergenceWarning, match="not positive definite"):
        result = implicit(cg())(problem)
    assert not result.diagnostics["converged"]
    assert "breakdown" in result.diagnostics["solver_info"]
    assert torch.isfinite(result.vector).all()
    # d w*/d lam = -w* / (a + lam);  dL/dlam = (w* - target) . d w*/d lam
    expected = float((w_star - target) @ (-w_star / (a + lam)))
    by_exact = implicit(exact())(problem)
    assert float(by_exact.grad_natural["lam"]) == pytest.approx(expected, rel=1e-10)


def test_solver_that_does_not_converge_warns_with_residual():
    data = load_dataset("diabetes")
    lp = ridge(data, regularization="per_feature", l2=0.5)
    problem = lp.problem(steps=1, params=lp.solve())
    with pytest.warns(ConvergenceWarning, match=r"maxiter=1; relative residual"):
        result = implicit(cg(maxiter=1))(problem)
    assert not result.diagnostics["converged"] and result.diagnostics["residual"] > 1e-10


def test_not_stationary_warns_and_warn_false_is_silent():
    lp = ridge(synthetic(), regularization="scalar")
    problem = lp.problem(steps=3)
    with pytest.warns(ConvergenceWarning, match="did not reach a stationary point"):
        result = implicit()(problem)
    assert not result.diagnostics["stationary"]
    assert result.diagnostics["relative_grad_norm"] > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        implicit(cg(maxiter=1), warn=False)(problem)


def test_train_loss_is_the_epoch_average_over_minibatches():
    data = synthetic()
    lp = ridge(data, regularization="per_feature", l2=2.0)
    _, expected = closed_form(lp, data)
    # lr = 0 keeps theta at the full-data minimiser while the source has 4 batches per epoch
    problem = lp.problem(hd.sgd(0.0), steps=2, params=lp.solve(), batch_size=30)
    result = implicit(exact())(problem)
    assert result.diagnostics["train_batches"] == 4
    assert rel(result.grad_natural["l2"], expected) <= 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        one_batch = implicit(exact(), train_batches=1)(problem)
    assert rel(one_batch.grad_natural["l2"], expected) > 1e-3


def test_bad_input():
    with pytest.raises(hd.HyperdiffError, match="implicit: solver must be made by"):
        implicit("lu")
    with pytest.raises(hd.HyperdiffError, match="implicit: solver must be made by"):
        implicit(torch.linalg.solve)
    assert implicit("exact").options["solver"].name == "exact"
    with pytest.raises(hd.HyperdiffError, match="implicit: stationarity_tol must be a positive"):
        implicit(stationarity_tol=0.0)
    with pytest.raises(hd.HyperdiffError, match="implicit: train_batches must be a positive int"):
        implicit(train_batches=0)
    x, y, x_val, y_val = synthetic()

    def loss(params, hparams, batch):
        return ((batch[0] @ params["w"] - batch[1]) ** 2).mean() + hparams["l2"] * 0

    problem = hd.make_problem(
        loss,
        loss,
        hd.HyperParameters(l2=hd.scalar(1.0)),
        {"w": torch.zeros(6, dtype=D)},
        optimizer=hd.sgd(0.1),
        train_data=(x, y),
        val_data=(x_val, y_val),
        steps=2,
        buffers={"running_mean": torch.zeros(6, dtype=D)},
        probe=False,
    )
    with pytest.raises(hd.HyperdiffError, match="implicit: the model must have no buffers"):
        implicit()(problem)


def test_val_change_is_the_remaining_change_of_the_validation_loss_and_warns():
    """Oracle: the closed-form ridge minimiser. After 10 steps the gradient test passes
    (relative gradient < 1e-3) but the validation loss still has 4e-3 of itself to go: the
    first-order prediction -<v, grad L_train> matches it and the new test warns."""
    data = synthetic()
    lp = ridge(data, regularization="per_feature", l2=2.0)
    w_star = ridge_solution(data[0], data[1], lp.hparams.natural()["l2"])

    def val(w):
        return float(lp.val_loss({"w": w}, None, lp.val_data))

    with pytest.warns(ConvergenceWarning, match="validation loss would still change"):
        early = implicit(exact())(lp.problem(steps=10))
    d = early.diagnostics
    assert d["relative_grad_norm"] < 1e-3 and not d["stationary"]
    assert d["val_change"] == pytest.approx(val(w_star) - val(early.params["w"]), rel=0.05)
    assert d["relative_val_change"] > 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        later = implicit(exact())(lp.problem(steps=20))
    assert later.diagnostics["stationary"]
    assert later.diagnostics["val_change"] == pytest.approx(
        val(w_star) - val(later.params["w"]), rel=1e-3)


def test_val_change_of_the_fixed_point_form_equals_the_stationary_form_for_plain_sgd():
    """For SGD, Phi(theta) - theta = -lr g and I - dPhi/dtheta = lr H: both forms predict the
    same step -H^-1 g, hence the same first-order change of the validation loss."""
    lp = ridge(synthetic(), regularization="per_feature", l2=2.0)
    problem = lp.problem(steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        stationary = implicit(exact())(problem).diagnostics["val_change"]
        fixed = implicit(exact(), fixed_point=True)(problem).diagnostics["val_change"]
    assert abs(stationary) > 1e-5
    assert fixed == pytest.approx(stationary, rel=1e-8)
