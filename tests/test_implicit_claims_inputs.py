"""Implicit differentiation and solver claims that gave wrong numbers or disagreed with
themselves (the review of session 42):

- ``implicit(fixed_point=True)`` with AdamW's decoupled weight decay froze Adam's moments,
  which at AdamW's fixed point follow theta (``wd theta + g / (|g| + eps) = 0``), and gave a
  hypergradient about 2x the central differences of the training on a converged run: refused
  (a number or a hyperparameter name); the stationary form's warning no longer sends AdamW
  users to ``fixed_point=True``; coupled decay (``hd.adam``) and AdamW without decay still run;
- a NaN validation gradient: ``implicit(cg())`` and ``implicit(neumann())`` returned a
  hypergradient of exactly 0 (silently with ``warn=False``); now ``NonFiniteError`` naming the
  validation loss's gradient, offline and in an online window, and every solver refuses a
  non-finite ``b``;
- CG's breakdown message named another iteration than the ``iterations`` it reported;
- ``exact()`` on a numerically singular matrix (as ``docs/implicit.md`` now says).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hyperdiff as hd
from hyperdiff.engine.solvers import ConvergenceWarning, cg, exact, neumann
from hyperdiff.engine.training import initial_state
from hyperdiff.methods.implicit import implicit, implicit_segment

D = torch.float64


def _regression(n: int = 12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=D)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=D)
    return x, y


def _mse(params, hparams, batch):
    x, y = batch
    return 0.5 * ((x @ params["w"] - y) ** 2).mean()


def _adam_problem(optimizer, hparams, steps=3, train_loss=_mse):
    data = _regression()
    return hd.make_problem(train_loss, _mse, hparams, {"w": torch.zeros(3, dtype=D)},
                           optimizer=optimizer, train_data=data, val_data=data, steps=steps,
                           probe=False)


@pytest.mark.parametrize("decay", ["wd", 0.1])
def test_fixed_point_form_refuses_adamw_weight_decay(decay):
    problem = _adam_problem(hd.adamw(0.05, weight_decay=decay),
                            hd.HyperParameters(wd=hd.scalar(0.1)), steps=2)
    shown = repr(decay) if isinstance(decay, str) else str(decay)
    with pytest.raises(hd.HyperdiffError, match=(
            r"implicit: fixed_point=True must not be used with adamw's decoupled weight decay "
            rf"\(got weight_decay={shown}\); at AdamW's fixed point Adam's moments move with "
            r"theta.*use reverse\(\), forward\(\) or checkpointed\(\)")):
        implicit(exact(), fixed_point=True)(problem)


def test_fixed_point_form_still_runs_adamw_without_decay_and_adam_with_coupled_decay():
    # controls: neither is refused; both end at g_total = 0, where frozen moments scale the
    # whole system alike (the refusal is for the decoupled term alone)
    hparams = hd.HyperParameters(wd=hd.scalar(0.1))
    for optimizer in (hd.adamw(0.05, weight_decay=0.0), hd.adam(0.05, weight_decay="wd")):
        result = implicit(exact(), fixed_point=True, warn=False)(
            _adam_problem(optimizer, hparams, steps=2))
        assert torch.isfinite(result.grad["wd"]).all()


def test_stationary_form_warning_does_not_send_adamw_users_to_fixed_point():
    def train_loss(params, hparams, batch):
        return _mse(params, hparams, batch) * hparams["scale"]

    problem = _adam_problem(hd.adamw(0.05, weight_decay=0.1),
                            hd.HyperParameters(scale=hd.scalar(1.0)), steps=3,
                            train_loss=train_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        implicit(exact())(problem)
    texts = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    stationarity = [t for t in texts if "did not reach a stationary point: ||grad" in t]
    assert len(stationarity) == 1, texts
    assert "fixed_point=True" not in stationarity[0]
    assert ("adamw's decoupled weight decay keeps the end point off the stationary points of "
            "train_loss, and neither implicit form models it: use reverse(), forward() or "
            "checkpointed()") in stationarity[0]


def _kinked_val_problem():
    # ||w|| ** 1.5 written as (sum w^2) ** 0.75: autograd's gradient at w = 0 is 0 * inf = NaN
    def train_loss(params, hparams, batch):
        return 0.5 * hparams["lam"] * (params["w"] ** 2).sum() + 0.0 * batch.sum()

    def val_loss(params, hparams, batch):
        return ((params["w"] ** 2).sum()) ** 0.75 + 0.0 * batch.sum()

    return hd.make_problem(train_loss, val_loss, hd.HyperParameters(lam=hd.scalar(1.0)),
                           {"w": torch.zeros(3, dtype=D)}, optimizer=hd.sgd(0.5),
                           train_data=torch.zeros(2, dtype=D), val_data=torch.zeros(2, dtype=D),
                           steps=3, probe=False)


NAN_RHS = (r"the gradient of val_loss with respect to the parameters at the end point of "
           r"training must be finite \(got 3 NaN or inf entries of 3\)")


@pytest.mark.parametrize("solver", [cg(), neumann(), exact()], ids=lambda s: s.name)
def test_a_nan_validation_gradient_is_refused_not_read_as_zero(solver):
    for warn in (True, False):
        with pytest.raises(hd.NonFiniteError, match="implicit: " + NAN_RHS):
            implicit(solver, warn=warn)(_kinked_val_problem())


def test_an_online_window_refuses_a_nan_validation_gradient():
    problem = _kinked_val_problem()
    raw = problem.hparams.raw
    state = initial_state(problem, problem.hparams.view(raw), differentiable=False)
    with pytest.raises(hd.NonFiniteError, match=r"implicit \(an online window\): " + NAN_RHS):
        implicit_segment(problem, state, raw, 0, 2, [torch.zeros(2, dtype=D)], solver=cg())


@pytest.mark.parametrize("solver", [cg(), neumann(), exact()], ids=lambda s: s.name)
def test_every_solver_refuses_a_non_finite_right_hand_side(solver):
    b = torch.tensor([1.0, float("nan"), float("inf")], dtype=D)
    with pytest.raises(hd.NonFiniteError, match=rf"{solver.name}: b must be finite \(got 2 NaN "
                       r"or inf entries of 3\)"):
        solver(lambda v: v, b)


def test_cg_breakdown_message_names_the_iterations_it_reports():
    # by hand: p0 = b = (1, 1), p0'A p0 = 0.9, alpha = 2/0.9, r1 = (1 - 2/0.9, 1 + 0.2/0.9),
    # p1 = r1 + (|r1|^2 / 2) p0 = (0.272, 2.716), p1'A p1 = -0.664: one iteration completed
    a = torch.diag(torch.tensor([1.0, -0.1], dtype=D))
    b = torch.tensor([1.0, 1.0], dtype=D)
    r1 = b - (2 / 0.9) * (a @ b)
    p1 = r1 + (float(r1 @ r1) / 2) * b
    with pytest.warns(ConvergenceWarning, match="not positive definite"):
        result = cg()(lambda v: a @ v, b)
    assert result.iterations == 1 and not result.converged
    assert result.info.startswith(
        f"breakdown after 1 iteration: the next direction's p'Ap = {float(p1 @ a @ p1):.3g} <= 0")
    assert "iteration 2" not in result.info


def test_exact_on_a_numerically_singular_matrix_is_flagged_as_documented():
    # control (passes before): rank-5 PSD 6x6; rounding leaves every LU pivot nonzero, so
    # torch.linalg.solve answers (no least-squares fallback), flagged ill conditioned
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=D))[0]
    s = q @ torch.diag(torch.tensor([0, 0.01, 0.1, 0.5, 1, 2], dtype=D)) @ q.T
    b = torch.randn(6, generator=g, dtype=D)
    result = exact()(lambda v: s @ v, b, warn=False)
    assert not result.converged and "ill conditioned" in result.info
    assert "least-squares" not in result.info
    assert result.residual > 1e-3
