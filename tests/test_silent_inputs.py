"""Inputs that used to pass silently (or fail deep inside torch) get one clear error: the
review of 7 Dec (NumPy noise and in-place edits in a loss, dropout off in training, folds read
differently, a loss without a gradient, float32 rounding of a coefficient, late bad batches,
a test split the model cannot take, BatchNorm statistics missing, small argument checks)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import hyperdiff as hd
from hyperdiff.errors import LossError
from hyperdiff.tuner.driver import HyperOptimizer, Stopping

D = torch.float64
X = torch.linspace(-1, 1, 60, dtype=D).reshape(20, 3)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=D)
W0 = {"w": torch.zeros(3, dtype=D)}


def mse(p, h, b):
    return ((b[0] @ p["w"] - b[1]) ** 2).mean()


def make(train_loss=mse, val_loss=mse, hparams=None, params=None, **kw):
    kw = {"optimizer": hd.sgd("lr"), "train_data": (X, Y), "val_data": (X, Y), "steps": 3,
          **kw}
    return hd.make_problem(train_loss, val_loss,
                           hparams or hd.HyperParameters(lr=hd.scalar(0.1)),
                           params or W0, **kw)


# --- randomness and data a replay would not repeat ------------------------------------------

@pytest.mark.parametrize("draw, name", [
    (lambda n: torch.as_tensor(np.random.randn(n)), "NumPy's np.random"),
    (lambda n: torch.tensor([random.random() for _ in range(n)], dtype=D), "Python's random"),
])
def test_a_loss_drawing_from_an_unseeded_global_generator_is_refused(draw, name):
    def noisy(p, h, b):
        return ((b[0] @ p["w"] - b[1] - 0.5 * draw(len(b[1]))) ** 2).mean()

    py, legacy = random.getstate(), np.random.get_state()
    with pytest.raises(hd.HyperdiffError, match=rf"train_loss must draw its randomness from "
                       rf"torch .*got draws from {name}"):
        make(train_loss=noisy)
    assert random.getstate() == py  # the user's generators are put back
    assert np.array_equal(np.random.get_state()[1], legacy[1])


def test_torch_randomness_in_a_loss_replays_and_is_accepted():
    def noisy(p, h, b):
        return ((b[0] @ p["w"] - b[1] - 0.5 * torch.randn_like(b[1])) ** 2).mean()

    problem = make(train_loss=noisy)
    first, again = hd.reverse()(problem), hd.reverse()(problem)
    assert torch.equal(first.grad["lr"], again.grad["lr"])


def test_a_loss_that_edits_its_batch_in_place_is_refused():
    def scaling(p, h, b):
        b[0].mul_(1.01)
        return mse(p, h, b)

    with pytest.raises(hd.HyperdiffError, match=r"train_loss must not modify its batch in "
                       r"place .*x = x \* 2"):
        make(train_loss=scaling, train_data=(X.clone(), Y))
    with pytest.raises(hd.HyperdiffError, match=r"val_loss must not modify its batch"):
        make(val_loss=scaling, val_data=(X.clone(), Y))


# --- the model ------------------------------------------------------------------------------

def dropout_net():
    torch.manual_seed(0)
    return hd.functional(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5),
                                       nn.Linear(8, 1)).double())


def test_dropout_in_a_training_loss_without_ctx_is_refused():
    net = dropout_net()

    def without_ctx(p, h, b):
        return ((net(p, b[0])[:, 0] - b[1]) ** 2).mean()

    def with_ctx(p, h, b, ctx):
        return ((net(p, b[0], ctx)[:, 0] - b[1]) ** 2).mean()

    with pytest.raises(hd.HyperdiffError, match=r"has dropout \('2' \(Dropout\)\).* "
                       r"net\(params, x, ctx\)"):
        make(train_loss=without_ctx, val_loss=without_ctx, params=net.params)
    # training with ctx, evaluating without (eval mode, dropout off: right for a validation)
    result = hd.hypergradient(with_ctx, without_ctx, hd.HyperParameters(lr=hd.scalar(0.1)),
                              net.params, optimizer=hd.sgd("lr"), train_data=(X, Y),
                              val_data=(X, Y), steps=3)
    assert torch.isfinite(result.grad["lr"]).all()


def test_dropout_with_probability_zero_needs_no_ctx():
    torch.manual_seed(0)
    net = hd.functional(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Linear(4, 1)).double())

    def loss(p, h, b):
        return ((net(p, b[0])[:, 0] - b[1]) ** 2).mean()

    make(train_loss=loss, val_loss=loss, params=net.params)


def test_batch_norm_statistics_missing_from_the_buffers_are_named():
    torch.manual_seed(0)
    net = hd.functional(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(),
                                      nn.Linear(8, 1)).double())

    def loss(p, h, b, ctx):
        return ((net(p, b[0], ctx)[:, 0] - b[1]) ** 2).mean()

    with pytest.raises(hd.HyperdiffError, match=r"BatchNorm running statistics "
                       r"\['1.running_mean', '1.running_var'\] must be among the buffers .*"
                       r"buffers=net.buffers"):
        make(train_loss=loss, val_loss=loss, params=net.params)
    make(train_loss=loss, val_loss=loss, params=net.params, buffers=net.buffers)


# --- losses ---------------------------------------------------------------------------------

def test_a_validation_loss_without_a_gradient_is_refused():
    def zero_one(p, h, b):
        return ((b[0] @ p["w"]).sign() != b[1].sign()).double().mean()

    with pytest.raises(hd.HyperdiffError, match=r"val_loss must be differentiable .*argmax, "
                       r"comparisons"):
        make(val_loss=zero_one)


def test_a_loss_failing_after_the_probe_names_the_step_and_the_shapes():
    batches = [(X, Y), (X, Y), (X, Y), (X[:, :2], Y)]
    problem = make(train_data=batches, steps=4)
    with pytest.raises(LossError, match=r"train_loss raised RuntimeError at step 3 \(seed 0\): "
                       r".*batch\[0\] \(20, 2\) float64.*parameters: w \(3,\)") as caught:
        hd.reverse()(problem)
    assert isinstance(caught.value, RuntimeError)  # vmap / forward-mode fallbacks see one
    assert isinstance(caught.value, hd.HyperdiffError)


def test_a_coefficient_that_rounds_onto_its_bound_in_float32_is_refused():
    hparams = hd.HyperParameters(lr=hd.scalar(0.01), b2=hd.scalar(1 - 1e-9, (0.0, 1.0)))
    adam = hd.adam("lr", betas=(0.9, "b2"))
    x32, y32 = X.float(), Y.float()
    with pytest.raises(hd.HyperdiffError, match=r"the adam beta2, must be .* in float32, the "
                       r"dtype training computes it in \(got \[0.99999999.*\], which rounds to "
                       r"\[1.0\] there\)"):
        make(hparams=hparams, optimizer=adam, params={"w": torch.zeros(3)},
             train_data=(x32, y32), val_data=(x32, y32))
    make(hparams=hparams, optimizer=adam)  # float64: 1 - 1e-9 is below 1


# --- folds ----------------------------------------------------------------------------------

def test_folds_must_read_their_shared_raw_values_the_same_way():
    plain = make()
    interval = make(hparams=hd.HyperParameters(lr=hd.scalar(0.1, (0.0, 1.0))))
    with pytest.raises(hd.HyperdiffError, match=r"problems\[1\]'s hyperparameter 'lr' must be "
                       r"HyperParameter 'scalar' of shape \(\) with Positive.*got .*Interval"):
        HyperOptimizer([plain, interval], stopping=Stopping(max_steps=1))
    per_tensor = make(hparams=hd.HyperParameters(lr=hd.per_tensor(W0, 0.1)))
    with pytest.raises(hd.HyperdiffError, match=r"'per_tensor' of shape \(1,\)"):
        HyperOptimizer([plain, per_tensor], stopping=Stopping(max_steps=1))
    HyperOptimizer([plain, make()], stopping=Stopping(max_steps=1))  # same kinds: accepted


# --- tasks ----------------------------------------------------------------------------------

def given_task(**splits):
    return hd.task("t", model=W0, train_loss=mse, val_loss=mse,
                   hparams=hd.HyperParameters(lr=hd.scalar(0.1)), optimizer=hd.sgd("lr"),
                   data=hd.given_splits(**{"train": (X, Y), "val": (X, Y), "test": (X, Y),
                                           **splits}, allow_shared_rows=True), steps=3)


def test_a_test_split_the_model_cannot_take_is_refused_when_the_task_is_built():
    wide = torch.zeros(20, 4, dtype=D)
    with pytest.raises(hd.HyperdiffError, match=r"task t: metrics failed on the test split at "
                       r"the initial parameters \(RuntimeError: .*its batch: batch\[0\] "
                       r"\(20, 4\) float64"):
        given_task(test=(wide, Y)).build()
    assert sorted(given_task().build().splits) == ["selection", "test", "val"]


def test_a_negative_selection_fraction_is_refused_for_given_splits():
    with pytest.raises(hd.HyperdiffError, match=r"selection_fraction must be a finite number in "
                       r"\[0, 1\) \(got -0.5\)"):
        given_task().build(selection_fraction=-0.5)


# --- small argument checks ------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: hd.minibatches(X, Y, batch_size=4, shuffle="no"),
     r"minibatches: shuffle must be True or False \(got 'no'\)"),
    (lambda: hd.data.stream(X), r"stream needs .* which would stream each row as its own batch"),
    (lambda: hd.forward("double_vjp"),
     r"chunk_size must be a positive int or None \(got 'double_vjp', an engine: pass it as "
     r"hd.forward\(engine='double_vjp'\)\)"),
    (lambda: hd.HyperParameters(lr=hd.scalar(0.1)).with_raw({"lr": "a"}),
     r"with_raw: raw must be a dict of name -> raw tensor \(got \{'lr': 'a'\}\)"),
])
def test_small_arguments_are_checked(call, match):
    with pytest.raises(hd.HyperdiffError, match=match):
        call()


def test_a_negative_step_is_not_blamed_on_a_short_schedule():
    hp = hd.HyperParameters(lr=hd.per_step(3, 0.1))
    with pytest.raises(hd.HyperdiffError, match=r"step must be in \[0, 3\) \(got -1\)$"):
        hp.view(hp.raw).at("lr", step=-1)
    with pytest.raises(hd.HyperdiffError, match=r"\(got 3\); the schedule is shorter"):
        hp.view(hp.raw).at("lr", step=3)


def fd_problem(dtype):
    x = torch.linspace(-1, 1, 24, dtype=dtype).reshape(12, 2)
    y = x @ torch.tensor([1.0, -2.0], dtype=dtype)
    loss = lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()  # noqa: E731
    return hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.1)),
                           {"w": torch.zeros(2, dtype=dtype)}, optimizer=hd.sgd("lr"),
                           train_data=(x, y), val_data=(x, y), steps=5, probe=False)


@pytest.mark.parametrize(("dtype", "eps"), [(torch.float64, 1e-17), (torch.float64, 1e-300),
                                            (torch.float32, 1e-9)])
def test_a_finite_difference_step_that_rounds_away_is_refused(dtype, eps):
    """log(0.1) = -2.30 +- eps * 2.30 rounds to itself in the dtype the problem trains in:
    until s39 every coordinate came back as an exact 0."""
    with pytest.raises(hd.HyperdiffError, match=rf"eps = {eps:.3g} does not move the raw value "
                       r"of lr \(-2.30259\) in float(64|32): .*\(the default for this dtype is"):
        hd.finite_difference(eps=eps, warn=False)(fd_problem(dtype))


@pytest.mark.parametrize("eps", [1.0, 10.0, 0.0, -1e-6, float("nan")])
def test_a_finite_difference_step_outside_0_1_is_refused(eps):
    with pytest.raises(hd.HyperdiffError, match=r"finite_difference: eps must be a finite "
                       r"number in \(0, 1\)"):
        hd.finite_difference(eps=eps)


def test_a_small_finite_difference_step_that_moves_the_value_agrees_with_reverse():
    problem = fd_problem(torch.float64)
    fd = hd.finite_difference(eps=1e-7, warn=False)(problem).grad["lr"]
    assert float(fd) == pytest.approx(float(hd.reverse()(problem).grad["lr"]), rel=1e-6)


@pytest.mark.parametrize(("horizon", "why"), [
    (100, "its later part would never train"),
    (3, "it ends before the run"),
])
def test_a_schedule_over_another_horizon_than_the_run_is_refused(horizon, why):
    """A warmup-cosine over 100 steps in a run of 10 stayed in its warmup, and lr_final got an
    exact 0 (until s39); one over 3 steps failed at step 3, deep in the training."""
    schedule = hd.schedule("warmup_cosine", horizon)
    x = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(12, 2)
    loss = lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()  # noqa: E731
    with pytest.raises(hd.HyperdiffError, match=rf"the warmup_cosine schedule of lr must be "
                       rf"defined over the run's steps=10 \(got {horizon}: {why}.*\); use "
                       r"schedule.with_steps\(10\)"):
        hd.make_problem(loss, loss, hd.HyperParameters(**schedule.hyperparameters()),
                        {"w": torch.zeros(2, dtype=torch.float64)}, optimizer=hd.sgd(schedule),
                        train_data=(x, x.sum(1)), val_data=(x, x.sum(1)), steps=10)


def test_a_selection_data_loader_is_read_as_val_data_is():
    """It was refused blaming val_loss ('DataLoader' object is not subscriptable) until s39."""
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(12, 2)
    y = x.sum(1)
    problem = fd_problem(torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    opt = HyperOptimizer(problem, selection=loader, stopping=Stopping(max_steps=1))
    listed = HyperOptimizer(problem, selection=[(x[i:i + 5], y[i:i + 5]) for i in (0, 5, 10)],
                            stopping=Stopping(max_steps=1))
    assert opt.run().history[0].selection_loss == listed.run().history[0].selection_loss
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: selection must hold at least "
                       r"one batch \(got 0\)"):
        HyperOptimizer(problem, selection=[])
