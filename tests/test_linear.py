"""Ready-made linear problems: closed forms against scikit-learn, autograd and finite
differences (float64)."""

from __future__ import annotations

import pytest
import torch

import hyperdiff as hd
from hyperdiff.testing.linear import (
    load_dataset,
    logistic,
    ridge,
    ridge_hypergradient,
    ridge_solution,
)

from conftest import synthetic_regression

D = torch.float64


synthetic = synthetic_regression


def test_load_dataset_offline_shapes_and_standardisation():
    data = load_dataset("breast_cancer", val_fraction=0.3, seed=0)
    assert data.x_train.shape[1] == 30 and data.x_train.dtype == D
    assert data.x_train.shape[0] + data.x_val.shape[0] == 569
    assert torch.allclose(data.x_train.mean(0), torch.zeros(30, dtype=D), atol=1e-12)
    assert set(data.y_train.unique().tolist()) == {0.0, 1.0}
    digits = load_dataset("digits")
    assert digits.y_train.dtype == torch.long and digits.x_train.shape[1] == 64
    diabetes = load_dataset("diabetes")
    assert abs(float(diabetes.y_train.mean())) < 1e-9
    with pytest.raises(hd.HyperdiffError, match="load_dataset: name must be one of"):
        load_dataset("iris")


def test_ridge_solution_matches_scikit_learn():
    from sklearn.linear_model import Ridge

    x, y, _, _ = synthetic()
    w = ridge_solution(x, y, 2.5)
    sk = Ridge(alpha=2.5, fit_intercept=False, solver="cholesky").fit(x.numpy(), y.numpy())
    assert torch.allclose(w, torch.as_tensor(sk.coef_), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["scalar", "per_feature", "per_sample"])
def test_ridge_hypergradient_formula_matches_autograd_of_closed_form(which):
    x, y, x_val, y_val = synthetic()
    d, n = x.shape[1], x.shape[0]
    lam = torch.tensor(1.7, dtype=D) if which == "scalar" else torch.linspace(0.5, 3, d, dtype=D)
    c = torch.linspace(0.5, 1.5, n, dtype=D)
    answer = ridge_hypergradient(x, y, x_val, y_val, lam, c)
    lam_leaf, c_leaf = lam.clone().requires_grad_(), c.clone().requires_grad_()
    w = ridge_solution(x, y, lam_leaf, c_leaf)
    value = 0.5 * ((x_val @ w - y_val) ** 2).mean()
    g_lam, g_c = torch.autograd.grad(value, (lam_leaf, c_leaf))
    assert float(value.detach()) == pytest.approx(float(answer.value), rel=1e-12)
    assert torch.allclose(answer.grad_l2, g_lam, rtol=1e-9, atol=1e-14)
    assert torch.allclose(answer.grad_sample_weight, g_c, rtol=1e-9, atol=1e-14)


def test_ridge_hypergradient_matches_finite_differences():
    x, y, x_val, y_val = synthetic()
    lam = 0.8
    h = 1e-5
    fd = (
        ridge_hypergradient(x, y, x_val, y_val, lam + h).value
        - ridge_hypergradient(x, y, x_val, y_val, lam - h).value
    ) / (2 * h)
    exact = ridge_hypergradient(x, y, x_val, y_val, lam).grad_l2
    assert float(exact) == pytest.approx(float(fd), rel=1e-7)


@pytest.mark.parametrize("which", ["scalar", "per_feature", "per_sample"])
def test_ridge_problem_losses_have_the_closed_form_minimiser(which):
    data = synthetic()
    lp = ridge(data, regularization=which, l2=1.3, fixed_l2=0.7)
    nat = lp.hparams.natural()
    lam = nat["l2"] if "l2" in nat else torch.tensor(0.7, dtype=D)
    c = nat.get("sample_weight")
    expected = ridge_solution(data[0], data[1], lam, c)
    assert torch.allclose(lp.solve()["w"], expected, rtol=1e-10, atol=1e-12)
    # gradient of the library loss vanishes at the closed form
    w = expected.clone().requires_grad_()
    (g,) = torch.autograd.grad(lp.full_train_loss({"w": w}), w)
    assert float(g.norm()) <= 1e-12
    shapes = {"scalar": (), "per_feature": (6,), "per_sample": (120,)}
    assert next(iter(lp.hparams.values())).shape == shapes[which]


def test_binary_logistic_solution_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    data = load_dataset("breast_cancer")
    lp = logistic(data, regularization="scalar", l2=2.0, intercept_l2=0.0)
    theta = lp.solve()
    sk = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(
        data.x_train.numpy(), data.y_train.numpy()
    )
    assert torch.allclose(theta["w"], torch.as_tensor(sk.coef_[0]), rtol=1e-4, atol=1e-5)
    assert float(theta["b"]) == pytest.approx(float(sk.intercept_[0]), rel=1e-4, abs=1e-5)


def test_multinomial_logistic_shapes_and_newton_solution():
    digits = logistic(load_dataset("digits"), regularization="per_feature")
    assert digits.kind == "multinomial" and digits.num_params == 650
    assert digits.hparams.numel == 64
    g = torch.Generator().manual_seed(0)
    x, x_val = torch.randn(90, 4, generator=g, dtype=D), torch.randn(30, 4, generator=g, dtype=D)
    y, y_val = torch.arange(90) % 3, torch.arange(30) % 3
    lp = logistic((x, y, x_val, y_val), regularization="per_feature", l2=0.5)
    theta = lp.solve()
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    grads = torch.autograd.grad(lp.full_train_loss(leaves), list(leaves.values()))
    assert max(float(g.norm()) for g in grads) <= 1e-12
    # the softmax is invariant to a shift of all intercepts; the small intercept penalty
    # pins the shift at zero
    assert abs(float(theta["b"].sum())) <= 1e-10
    # same minimiser as scikit-learn's multinomial model up to that shift (probabilities)
    from sklearn.linear_model import LogisticRegression

    sk = LogisticRegression(C=2.0, tol=1e-12, max_iter=10_000).fit(x.numpy(), y.numpy())
    ours = torch.softmax(x @ theta["w"] + theta["b"], 1)
    assert torch.allclose(ours, torch.as_tensor(sk.predict_proba(x.numpy())), atol=1e-3)


def test_smoothness_bounds_the_hessian():
    data = load_dataset("breast_cancer")
    lp = logistic(data, regularization="per_feature", l2=3.0)
    names = list(lp.params)

    def f(v):
        return lp.full_train_loss({"w": v[:30], "b": v[30]})

    bound = lp.smoothness()
    solution = lp.solve()
    for theta in (torch.zeros(31, dtype=D), torch.cat([solution["w"], solution["b"][None]])):
        hessian = torch.autograd.functional.hessian(f, theta)
        top = float(torch.linalg.eigvalsh(hessian)[-1])
        assert top <= bound * (1 + 1e-12)
    assert names == ["w", "b"]


def test_per_sample_weights_follow_minibatches():
    data = synthetic(n=40)
    lp = ridge(data, regularization="per_sample")
    raw = {"sample_weight": torch.linspace(-1, 1, 40, dtype=D)}
    problem = lp.problem(steps=4, batch_size=10)
    hview = lp.hparams.view(raw)
    theta = {"w": torch.linspace(-1, 1, 6, dtype=D)}
    batches = [problem.train_data.batch(s, problem.seed) for s in range(4)]
    mean = sum(lp.train_loss(theta, hview, b) for b in batches) / 4
    assert float(mean) == pytest.approx(float(lp.full_train_loss(theta, raw)), rel=1e-12)


def test_default_problem_trains_to_the_solution():
    data = synthetic()
    lp = ridge(data, regularization="per_feature")
    state, _ = hd.testing.train(lp.problem(steps=200))
    assert torch.allclose(state.params["w"], lp.solve()["w"], rtol=1e-9, atol=1e-11)


def test_bad_input():
    data = synthetic()
    with pytest.raises(hd.HyperdiffError, match="ridge: regularization must be one of"):
        ridge(data, regularization="per_group")
    with pytest.raises(hd.HyperdiffError, match="ridge: l2 must be a positive finite number"):
        ridge(data, l2=-1.0)
    with pytest.raises(hd.HyperdiffError, match="logistic: float labels must be 0 or 1"):
        logistic(data)
    x, y, xv, yv = data
    with pytest.raises(hd.HyperdiffError, match="must be 2-D with the same number of columns"):
        ridge((x, y, xv[:, :3], yv))
