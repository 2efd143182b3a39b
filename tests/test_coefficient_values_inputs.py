"""Optimizer coefficients outside what torch.optim accepts are refused wherever they come
from: a callable (checked over all steps when the problem is made, and its numbers at every
training step), raw values given to a method (a beta2 of 1.5 named as such, not blamed on the
learning rate; a tuning step that moves a value there is a failed step of the guard), and
``reversible``'s momentum, whose refusal shows the value."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import hyperdiff as hd
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan

D = torch.float64
X = torch.linspace(-1, 1, 48, dtype=D).reshape(16, 3)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=D)
W0 = {"w": torch.zeros(3, dtype=D)}


def mse(p, h, b):
    return ((b[0] @ p["w"] - b[1]) ** 2).mean()


def ridge(p, h, b):
    return mse(p, h, b) + h["l2"] * (p["w"] ** 2).sum()


def make(optimizer, hparams=None, loss=ridge, steps=4, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constraint wider than the valid values warns
        return hd.make_problem(loss, mse, hparams or hd.HyperParameters(l2=hd.scalar(0.01)),
                               W0, optimizer=optimizer, train_data=(X, Y), val_data=(X, Y),
                               steps=steps, **kw)


# --- callable coefficients -------------------------------------------------------------------

@pytest.mark.parametrize("optimizer, expected", [
    (lambda: hd.adam(0.05, betas=(0.9, lambda h, t, k: 1.5)),
     "adam: betas[1], a callable, must give a finite number in [0, 1) at every step (got 1.5 "
     "at step 0 for parameter 'w')"),
    (lambda: hd.adam(0.05, betas=(0.9, lambda h, t, k: 1.0)), "(got 1.0 at step 0"),
    (lambda: hd.adamw(0.05, betas=(lambda h, t, k: -0.1, 0.999)),
     "adamw: betas[0], a callable, must give a finite number in [0, 1)"),
    (lambda: hd.sgd(lambda h, t, k: -0.1), "sgd: lr, a callable, must give a finite number "
     ">= 0 at every step (got -0.1"),
    (lambda: hd.sgd(0.1, lambda h, t, k: -0.5), "sgd: momentum, a callable, must give"),
    (lambda: hd.adam(0.05, eps=lambda h, t, k: -1e-3), "adam: eps, a callable, must give a "
     "finite number > 0 at every step (got -0.001"),
    (lambda: hd.sgd(0.1, weight_decay=lambda h, t, k: float("nan")), "weight_decay, a callable"),
], ids=["adam-beta2-1.5", "adam-beta2-1", "adamw-beta1", "sgd-lr", "sgd-momentum", "adam-eps",
        "sgd-weight_decay"])
def test_a_callable_coefficient_torch_would_refuse_is_refused_by_make_problem(optimizer,
                                                                               expected):
    with pytest.raises(hd.HyperdiffError) as info:
        make(optimizer())
    assert expected in str(info.value)


def test_a_callable_is_checked_at_every_step_and_for_tensors_too():
    """Valid at steps 0, 1 and 3, a tensor of -0.1 at step 2: the step and value are named."""
    opt = hd.sgd(lambda h, t, k: h["l2"] * (-10.0 if t == 2 else 10.0))
    with pytest.raises(hd.HyperdiffError, match=r"sgd: lr, a callable, must give a finite "
                       r"number >= 0 at every step \(got -0\.1 at step 2 for parameter 'w'\)"):
        make(opt)
    opt = hd.adam(0.05, betas=(0.9, lambda h, t, k: 0.999 if t < 3 else 1.0))
    with pytest.raises(hd.HyperdiffError, match=r"got 1\.0 at step 3"):
        make(opt)


def test_a_callable_that_returns_no_number_is_refused():
    with pytest.raises(hd.HyperdiffError, match=r"sgd: lr, a callable, must return a number "
                       r"or a tensor \(got None at step 0"):
        make(hd.sgd(lambda h, t, k: None))


def test_training_checks_the_numbers_a_callable_gives_without_the_probe():
    problem = make(hd.sgd(lambda h, t, k: 0.1 if t < 2 else -0.1), probe=False)
    with pytest.raises(hd.HyperdiffError, match=r"sgd: lr, a callable, must give a finite "
                       r"number >= 0 at every step \(got -0\.1 at step 2"):
        hd.reverse()(problem)


def test_a_valid_callable_trains_as_the_hand_written_loop():
    """Control (passes before the fix too): a decaying callable lr gives what plain SGD on the
    ridge loss gives, written out."""
    steps, lam = 5, 0.01
    problem = make(hd.sgd(lambda h, t, k: 0.2 * (1 - t / steps)), steps=steps)
    w = torch.zeros(3, dtype=D)
    for t in range(steps):
        grad = 2 * X.T @ (X @ w - Y) / len(Y) + 2 * lam * w
        w = w - 0.2 * (1 - t / steps) * grad
    expected = float(((X @ w - Y) ** 2).mean())
    assert hd.reverse()(problem).value == pytest.approx(expected, rel=1e-12)


# --- raw values given to a method --------------------------------------------------------------

def adam_b2_problem():
    hp = hd.HyperParameters(lr=hd.scalar(0.05, "free"), b2=hd.scalar(0.99, (0.0, 2.0)))
    return make(hd.adam("lr", betas=(0.9, "b2")), hp, loss=mse), hp


@pytest.mark.parametrize("method", [hd.reverse(), hd.forward(), hd.checkpointed(2),
                                    hd.finite_difference(warn=False)],
                         ids=lambda m: m.name)
def test_raw_values_that_make_a_coefficient_invalid_name_it_not_the_learning_rate(method):
    problem, hp = adam_b2_problem()
    with pytest.raises(hd.NonFiniteError) as info:  # as a diverged run: the guard's failure
        method(problem, hp.with_natural(b2=1.5))
    text = str(info.value)
    assert "hypergradient: hyperparameter 'b2', the adam beta2, must be a finite number in " \
           "[0, 1) (got 1.5 at the raw values given" in text
    assert "learning rate" not in text


def test_a_negative_learning_rate_given_as_raw_values_is_refused():
    problem, hp = adam_b2_problem()
    with pytest.raises(hd.NonFiniteError, match=r"hyperparameter 'lr', the adam lr, must be a "
                       r"finite number >= 0 \(got -0\.05 "):
        hd.reverse()(problem, hp.with_natural(lr=-0.05))


def test_a_per_step_value_out_of_range_names_its_step():
    hp = hd.HyperParameters(lrs=hd.per_step(4, 0.1, "free"))
    problem = make(hd.sgd("lrs"), hp, loss=mse)
    bad = hp.with_natural(lrs=torch.tensor([0.1, 0.1, -0.2, 0.1], dtype=D))
    with pytest.raises(hd.NonFiniteError, match=r"hyperparameter 'lrs', the sgd lr, must be a "
                       r"finite number >= 0 \(got \[-0\.2\] from step 2 "):
        hd.reverse()(problem, bad)


def test_a_schedule_field_out_of_range_is_refused():
    schedule = hd.schedule("warmup_cosine", 4)
    specs = schedule.hyperparameters(peak=0.1)
    specs["lr_peak"] = hd.scalar(0.1, "free")
    hp = hd.HyperParameters(**specs)
    problem = make(hd.sgd(schedule), hp, loss=mse)
    with pytest.raises(hd.NonFiniteError, match=r"'lr_peak' must be a finite number > 0 "
                       r"\(got -0\.1\)"):
        hd.reverse()(problem, hp.with_natural(lr_peak=-0.1))


def test_valid_raw_values_give_the_same_result_as_the_collection():
    """Control: the check changes nothing for valid values (bit for bit)."""
    problem, hp = adam_b2_problem()
    given = hd.reverse()(problem, hp.raw)
    own = hd.reverse()(problem)
    assert given.value == own.value
    assert all(torch.equal(given.grad[n], own.grad[n]) for n in own.grad)


def test_a_tuning_step_that_makes_the_learning_rate_negative_is_a_failed_step():
    """lr at 0.9 x the stability limit 2/L: its hypergradient is positive, and an outer step
    of twice the value moves it to -lr. That step fails with the coefficient's message, the
    guard restores the last good value, halves the outer step and the run goes on."""
    top = float(torch.linalg.eigvalsh(2 * X.T @ X / len(Y)).max())
    lr0 = 1.8 / top
    problem = make(hd.sgd("lr"), hd.HyperParameters(lr=hd.scalar(lr0, "free")), loss=mse,
                   steps=10)
    grad = float(hd.reverse()(problem).grad["lr"])
    assert grad > 0
    logging.disable(logging.WARNING)
    try:
        history = HyperOptimizer(problem, method=hd.reverse(), plan=OfflinePlan(explore=0),
                                 optimizer="sgd", lr=2 * lr0 / grad,
                                 stopping=Stopping(max_steps=4, patience=None)).run().history
    finally:
        logging.disable(logging.NOTSET)
    assert [r.status for r in history] == ["ok", "failed", "ok", "ok"]
    assert history[1].hparams["lr"] < 0
    assert "hyperparameter 'lr', the sgd lr, must be a finite number >= 0" in history[1].message
    assert history[2].hparams == history[0].hparams
    assert all(r.hparams["lr"] > 0 for r in history if r.status == "ok")


# --- reversible ------------------------------------------------------------------------------

def test_reversible_names_the_momentum_it_refuses():
    hp = hd.HyperParameters(lr=hd.scalar(0.1), mom=hd.scalar(1.5, (0.0, 2.0)))
    problem = make(hd.sgd("lr", "mom"), hp, loss=mse)
    with pytest.raises(hd.HyperdiffError, match=r"reversible: the sgd momentum \(hyperparameter "
                       r"'mom'\) must be in \(0, 1\] at every step \(got 1\.5 at step 1\)"):
        hd.reversible()(problem)


def test_reversible_names_the_parameter_of_a_per_tensor_momentum():
    params = {"a": torch.zeros(2, dtype=D), "b": torch.zeros(1, dtype=D)}
    hp = hd.HyperParameters(lr=hd.scalar(0.1),
                            mom=hd.per_tensor(params, {"a": 0.5, "b": 1.25}, (0.0, 2.0)))

    def loss(p, h, b):
        return ((b[0][:, :2] @ p["a"] + p["b"] - b[1]) ** 2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem = hd.make_problem(loss, loss, hp, params, optimizer=hd.sgd("lr", "mom"),
                                  train_data=(X, Y), val_data=(X, Y), steps=3)
    with pytest.raises(hd.HyperdiffError, match=r"\(got 1\.25, first for parameter 'b', at "
                       r"step 1\)"):
        hd.reversible()(problem)
