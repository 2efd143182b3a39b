"""Optimizer coefficients at the edges of what they can hold: a callable coefficient checked at
the raw values a method is called at (as a hyperparameter's name is), a number beta that float32
holds as 1.0 trained as torch.optim trains it (the update casts only 1 - beta), ints too large
for a float refused naming the value, and what a warm start carries from one outer step to the
next (parameters and buffers; not the inner optimizer's state: docs/driver.md)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import hyperdiff as hd
from hyperdiff.engine.optimizers import (
    CALLABLE_CHECK_STEPS,
    CoefficientRangeError,
    check_number_coefficients,
    check_raw_coefficients,
)
from hyperdiff.errors import NonFiniteError, describe, number, positive_float

D = torch.float64
X = torch.linspace(-1, 1, 36, dtype=D).reshape(12, 3)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=D)


def mse(p, h, b):
    return ((b[0] @ p["w"] - b[1]) ** 2).mean()


def make(optimizer, params=None, steps=5, x=X, y=Y, **specs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'a' is free; 'u' reaches no loss
        return hd.make_problem(mse, mse, hd.HyperParameters(**(specs or {"u": hd.scalar(1.0)})),
                               params or {"w": torch.zeros(3, dtype=x.dtype)},
                               optimizer=optimizer, train_data=(x, y), val_data=(x, y),
                               steps=steps, probe=False)


def raw_check(problem, a, steps=None):
    check_raw_coefficients(problem.optimizer, problem.hparams, {"a": torch.tensor(a, dtype=D)},
                           problem.hparam_dtype, params=problem.params,
                           steps=problem.steps if steps is None else steps)


# 1: a callable coefficient at the raw values given


@pytest.mark.parametrize("lr", [lambda h, t, n: h["a"], lambda h, t, n: float(h["a"])],
                         ids=["tensor", "number"])
def test_a_callable_coefficient_is_refused_at_raw_values_that_make_it_invalid(lr):
    """s42: sgd(lambda h, t, n: h["a"]) at raw a = -0.3 trained with a negative learning rate
    (validation loss 14.05 from 0.59) where sgd("a") is refused."""
    problem = make(hd.sgd(lr), a=hd.scalar(0.1, "free"))
    raw_check(problem, 0.2)  # valid: nothing raised
    message = (r"hypergradient: the sgd lr, a callable, must give a finite number >= 0 at every "
               r"step \(got -0.3 at step 0 for parameter 'w' at the raw values given, in "
               r"float64\); keep the hyperparameters it reads where it is valid")
    with pytest.raises(CoefficientRangeError, match=message) as caught:
        raw_check(problem, -0.3)
    assert isinstance(caught.value, NonFiniteError)  # the outer guard's failed step


def test_the_raw_check_of_a_callable_names_the_first_invalid_step_and_reads_a_window():
    # lr_t = a - 0.1 t: at a = 0.25 valid at steps 0..2, negative from step 3
    problem = make(hd.sgd(lambda h, t, n: h["a"] - 0.1 * t), steps=6, a=hd.scalar(0.5, "free"))
    with pytest.raises(CoefficientRangeError, match=r"\(got -0.05 at step 3 for parameter 'w'"):
        raw_check(problem, 0.25)
    raw_check(problem, 0.25, steps=range(0, 3))  # a window of steps 0..2: valid there
    with pytest.raises(CoefficientRangeError, match=r"at step 4 for parameter"):
        raw_check(problem, 0.25, steps=range(4, 6))


def test_the_raw_check_of_a_callable_calls_it_at_most_as_check_callables_does():
    calls = []

    def lr(h, t, n):
        calls.append((t, n))
        return h["a"]

    params = {"w": torch.zeros(3, dtype=D), "b": torch.zeros((), dtype=D)}

    def loss(p, h, b):
        return mse(p, h, b) + p["b"] ** 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem = hd.make_problem(loss, loss, hd.HyperParameters(a=hd.scalar(0.1, "free")),
                                  params, optimizer=hd.sgd(lr), train_data=(X, Y),
                                  val_data=(X, Y), steps=1000, probe=False)
    raw_check(problem, 0.2)
    steps = sorted({t for t, _ in calls})
    assert len(calls) == 2 * CALLABLE_CHECK_STEPS and {n for _, n in calls} == {"w", "b"}
    assert len(steps) == CALLABLE_CHECK_STEPS and steps[0] == 0 and steps[-1] == 999
    calls.clear()
    check_raw_coefficients(problem.optimizer, problem.hparams, {"a": torch.tensor(-0.3, dtype=D)},
                           problem.hparam_dtype)  # without params and steps: no callable check
    assert calls == []


# 2: a number beta that float32 holds as 1.0


def test_a_beta_that_float32_holds_as_one_trains_as_torch_optim_adam():
    """s42: betas (0.99999999, 0.99999999) were refused in float32 ("which float32 holds as
    1.0"), but a number beta stays a Python float in the update, as in torch.optim.Adam."""
    betas = (0.99999999, 0.99999999)
    x, y = X.float(), Y.float()
    problem = make(hd.adam(0.1, betas), x=x, y=y)  # was refused
    (ours, _, _), _ = hd.testing.train(problem)
    w = torch.zeros(3, requires_grad=True)
    theirs = torch.optim.Adam([w], lr=0.1, betas=betas)
    for _ in range(5):
        theirs.zero_grad()
        mse({"w": w}, None, (x, y)).backward()
        theirs.step()
    assert torch.equal(ours["w"], w.detach())
    assert not torch.equal(w.detach(), torch.zeros(3))
    make(hd.adam(0.1, betas)).to("cpu", torch.float32)  # and Problem.to float32


def test_a_coefficient_the_update_casts_is_still_refused_where_it_rounds_out_of_range():
    with pytest.raises(hd.HyperdiffError, match=r"the adam eps must be a finite number > 0 in "
                                                r"float32, .*\(got 1e-50, which float32 holds as "
                                                r"0.0\)"):
        check_number_coefficients(hd.adam(0.1, eps=1e-50), torch.float32)
    # 1 - beta is what the update casts: 1e-8 is 0 in float16 (float32 holds it)
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "the adam betas[1] must leave 1 - betas[1] > 0 in float16, the dtype training "
            "computes it in (got 0.99999999, whose 1 - betas[1], 1.00000000502e-08, float16 "
            "holds as 0.0)")):
        check_number_coefficients(hd.adam(0.1, (0.9, 0.99999999)), torch.float16)


# 3: ints too large for a float


@pytest.mark.parametrize("build, message", [
    (lambda: hd.sgd(10**400), "sgd: lr must be a finite number >= 0"),
    (lambda: hd.sgd(0.1, 0.9, dampening=10**400), "sgd: dampening must be a finite number in "
                                                   "[0, 1]"),
    (lambda: hd.adam(0.1, eps=10**400), "adam: eps must be a finite number > 0"),
    (lambda: hd.adamw(0.1, weight_decay=-(10**400)), "adamw: weight_decay must be a finite "
                                                      "number >= 0"),
])
def test_an_int_too_large_for_a_float_is_refused_naming_it(build, message):
    """s42: these raised a bare OverflowError (int too large to convert to float)."""
    sign = "-" if "weight_decay" in message else ""
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            f"{message} (got {sign}1.000e+400, an int of 401 digits)")):
        build()


def test_a_callable_giving_an_int_too_large_for_a_float_is_refused_naming_it():
    message = re.escape("sgd: lr, a callable, must give a finite number >= 0 at every step "
                        "(got 1.000e+400, an int of 401 digits at step 0 for parameter 'w')")
    with warnings.catch_warnings(), pytest.raises(hd.HyperdiffError, match=message):
        warnings.simplefilter("ignore")  # 'u' reaches no loss
        hd.make_problem(mse, mse, hd.HyperParameters(u=hd.scalar(1.0)),
                        {"w": torch.zeros(3, dtype=D)}, optimizer=hd.sgd(lambda h, t, n: 10**400),
                        train_data=(X, Y), val_data=(X, Y), steps=2)  # the probe checks it


def test_the_error_helpers_refuse_and_abbreviate_huge_ints():
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "f: tol must be a positive finite number (got 1.000e+400, an int of 401 digits)")):
        positive_float("f", "tol", 10**400)
    with pytest.raises(hd.HyperdiffError, match=re.escape("(got -2.500e+450, an int of 451")):
        number("f", "x", -25 * 10**449)
    assert describe(10**5000) == "1.000e+5000, an int of 5001 digits"  # repr would raise
    assert describe(10**79) == str(10**79) and describe(123) == "123"  # short ints as they are
    assert describe(99 * 10**120 + 7) == "9.900e+121, an int of 122 digits"


# 4: what a warm start carries over (a control: docs/driver.md states it)


def test_a_warm_start_carries_parameters_and_restarts_the_inner_optimizer_state():
    """Two warm-started outer steps of T = 5 equal two Adam trainings of 5 steps, the second
    from the first's theta_T with fresh moments and bias correction (docs/driver.md), not one
    training of 10 steps."""
    def val(p, h, b):
        return mse(p, h, b) * h["u"]  # u never touches training

    def problem(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hd.make_problem(mse, val, hd.HyperParameters(u=hd.scalar(1.0)),
                                   {"w": torch.zeros(3, dtype=D)}, optimizer=hd.adam(0.1),
                                   train_data=(X, Y), val_data=(X, Y), steps=steps, probe=False)

    loop = hd.HyperOptimizer(problem(5), warm_start=True, lr=0.05,
                             stopping=hd.Stopping(max_steps=2))
    loop.step()
    loop.step()
    warm = loop.plan.warm[0][0]["w"]
    w = torch.zeros(3, dtype=D)
    for _ in range(2):  # written out: Adam restarted at each outer step
        leaf = w.clone().requires_grad_()
        adam = torch.optim.Adam([leaf], lr=0.1)
        for _ in range(5):
            adam.zero_grad()
            mse({"w": leaf}, None, (X, Y)).backward()
            adam.step()
        w = leaf.detach()
    assert torch.equal(warm, w)
    (continuous, _, _), _ = hd.testing.train(problem(10))
    assert not torch.allclose(warm, continuous["w"])


def test_a_method_call_at_raw_values_that_make_a_callable_invalid_fails_the_step():
    """End to end: reverse mode at raw a = -0.3 trained with lr -0.3 (ascent) before s42."""
    problem = make(hd.sgd(lambda h, t, n: h["a"]), a=hd.scalar(0.1, "free"))
    hd.reverse()(problem, {"a": torch.tensor(0.2, dtype=D)})  # valid: trains
    with pytest.raises(CoefficientRangeError, match=r"got -0.3 at step 0 for parameter 'w'"):
        hd.reverse()(problem, {"a": torch.tensor(-0.3, dtype=D)})
