"""``truncated(k, head="curvature")``, an exact tail over a carried head, and ``truncated``'s
``fraction`` (issue 20 item 4): against exact reverse mode where the curvature model is exact
(a train loss linear in theta with ``curvature_scale=0``; a quadratic whose Hessian is the
model's capped value), for ``k >= T``, against float64 central differences of the whole
training, and the options' refusals (float64, tiny problems)."""

from __future__ import annotations

import pytest
import torch
from test_offline_curvature import (
    EXACT_ROWS,
    assert_close,
    central_difference,
    edge_problem,
    make,
)
from test_online_curvature import linear_train_loss, mlp_train_loss

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.plans import configured_method
from hyperdiff.engine.training import initial_state

STEPS = 10


# --- (a) a zero Hessian, scale 0: the carried head is exact, so is the whole ----------------
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("kind, wd_kind, wd", EXACT_ROWS,
                         ids=[f"{k}-{w or f'wd={d}'}" for k, w, d in EXACT_ROWS])
def test_with_a_zero_hessian_the_head_makes_truncation_exact(kind, wd_kind, wd, k):
    """Reverse mode through all T steps is the reference: heavy-ball SGD (with and without
    momentum), Adam, AdamW, a warmup-cosine schedule's three values and a weight decay
    (hyperparameter or fixed). Without the head the same truncation is far off."""
    prob = make(linear_train_loss, STEPS, kind, wd_kind, wd=wd)
    exact = hd.reverse()(prob)
    ours = hd.truncated(k, head="curvature", curvature_scale=0.0)(prob)
    assert ours.value == pytest.approx(exact.value, rel=1e-13)
    assert_close(ours.grad, exact.grad, 1e-12)
    assert ours.diagnostics["differentiated_steps"] == k
    assert ours.diagnostics["head"] == "curvature"
    cut = hd.truncated(k)(prob)
    assert (cut.vector - exact.vector).abs().max() > 1e-3 * exact.vector.abs().max()


@pytest.mark.parametrize("k", [STEPS, STEPS + 5])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_with_k_at_least_t_the_head_is_reverse_mode(kind, k):
    """No head to carry: the whole run is differentiated exactly, on a nonlinear loss."""
    prob = make(mlp_train_loss, STEPS, kind, "scalar")
    exact = hd.reverse()(prob)
    ours = hd.truncated(k, head="curvature")(prob)
    assert_close(ours.grad, exact.grad, 1e-12)
    assert ours.diagnostics["head"] is None


# --- (b) a Hessian that the model gives exactly ---------------------------------------------
@pytest.mark.parametrize("with_decay", [False, True], ids=["lr", "lr+wd"])
@pytest.mark.parametrize("k", [1, 4])
def test_where_the_capped_model_is_the_hessian_the_head_is_exact(with_decay, k):
    """A quadratic with Hessian ``EDGE I`` at the heavy-ball stability edge: with a huge
    ``curvature_scale`` the model's cap binds and is the Hessian, so the head's momentum and
    curvature terms are both exact and live; the head with scale 0 (no Hessian) is not."""
    prob = edge_problem(with_decay)
    exact = hd.reverse()(prob)
    ours = hd.truncated(k, head="curvature", curvature_scale=1e30)(prob)
    assert_close(ours.grad, exact.grad, 1e-10)
    flat = hd.truncated(k, head="curvature", curvature_scale=0.0)(prob)
    assert abs(float(flat.grad["lr"] - exact.grad["lr"])) > 1e-2 * abs(float(exact.grad["lr"]))


# --- (c) against central differences of the whole training ---------------------------------
@pytest.mark.parametrize("kind", ["sgd0", "sgd"])
def test_the_head_matches_central_differences_of_the_whole_training(kind):
    """Every raw value (the schedule's three and the coupled weight decay) against float64
    central differences of the whole training, on a loss where the model is exact."""
    prob = make(linear_train_loss, STEPS, kind, "scalar")
    ours = hd.truncated(4, head="curvature", curvature_scale=0.0)(prob)
    for name in prob.raw_tensors():
        reference = central_difference(prob, name)
        assert abs(reference) > 1e-4, name
        assert float(ours.grad[name]) == pytest.approx(reference, rel=1e-7, abs=1e-10), name


# --- (d) fraction: k as a share of each problem's steps ------------------------------------
@pytest.mark.parametrize("fraction, steps, k", [(0.25, 10, 3), (0.5, 10, 5), (0.3, 7, 3),
                                                (1.0, 7, 7), (0.01, 10, 1), (0.07, 100, 7)])
def test_fraction_takes_ceil_of_its_share_of_the_steps(fraction, steps, k):
    """``k = ceil(f T)``, counted by hand (0.07 * 100 is 7.000000000000001 in floats)."""
    prob = make(mlp_train_loss, steps, "sgd", "scalar")
    ours = hd.truncated(fraction=fraction)(prob)
    same = hd.truncated(k)(prob)
    assert ours.diagnostics["k"] == k == ours.diagnostics["differentiated_steps"]
    assert torch.equal(ours.vector, same.vector)
    headed = hd.truncated(fraction=fraction, head="curvature")(prob)
    assert torch.equal(headed.vector, hd.truncated(k, head="curvature")(prob).vector)


def test_the_config_builds_fraction_and_head():
    method = configured_method(load_config(overrides=[
        "method.name=truncated", "method.fraction=0.25", "method.head=curvature"]))
    assert (method.name, method.options) == ("truncated", {"fraction": 0.25, "head": "curvature",
                                                           "curvature_scale": None})


# --- (e) refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({}, r"^truncated: k must be a positive int, or None with a fraction given \(exactly "
         r"one of k and fraction\) \(got None\)$"),
    ({"k": 3, "fraction": 0.5}, r"^truncated: k must be .*exactly one of k and fraction\) "
                                r"\(got 3\)$"),
    ({"fraction": 0.0}, r"^truncated: fraction must be a number in \(0, 1\] \(got 0.0\)$"),
    ({"fraction": 1.5}, r"^truncated: fraction must be a number in \(0, 1\] \(got 1.5\)$"),
    ({"fraction": "half"}, r"^truncated: fraction must be a number in \(0, 1\] \(got 'half'\)$"),
    ({"k": 2, "head": "forward"}, r"^truncated: head must be one of \[None, 'curvature'\] "
                                  r"\(got 'forward'\)$"),
    ({"k": 2, "curvature_scale": 1.0}, r"^truncated: curvature_scale must be None without "
                                       r"head='curvature'"),
    ({"k": 2, "head": "curvature", "curvature_scale": -1.0},
     r"^truncated: curvature_scale must be None, one of \['auto', 'rows'\], 0 or a number > 0 "
     r"\(got -1.0\)$"),
])
def test_truncated_refuses_bad_options_naming_the_value(options, message):
    with pytest.raises(hd.HyperdiffError, match=message):
        hd.truncated(**options)


@pytest.mark.parametrize("options", [{"fraction": 0.5}, {"k": 2, "head": "curvature"}])
def test_an_offline_option_refuses_an_online_segment(options):
    prob = make(mlp_train_loss, 4, "sgd", "scalar")
    with torch.no_grad():
        state = initial_state(prob, differentiable=False)
    with pytest.raises(hd.HyperdiffError, match=r"^truncated: an online segment takes k steps "
                                                r"back \(got the offline options "):
        hd.truncated(**options).segment(prob, state, prob.raw_tensors(), 0, 4, prob.val_data)
    with pytest.raises(hd.HyperdiffError, match=r"^config: method.(fraction|head) is not used "
                                                r"by online truncated"):
        configured_method(load_config(overrides=[
            'outer.mode=online', "method.name=truncated",
            *(f"method.{k}={v}" for k, v in options.items())]))

