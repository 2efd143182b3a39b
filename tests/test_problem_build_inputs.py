"""make_problem's boundary (s42 review): schedules that share their hyperparameters, per_tensor
and per_element hyperparameters read in a loss, the failing step of the start-up check, a
one-row BatchNorm batch, the caller named in messages, loss modules and sparse parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hyperdiff as hd
from hyperdiff.app.lightning.optim import inner_optimizer

D = torch.float64
X = torch.linspace(-1, 1, 36, dtype=D).reshape(12, 3)
Y = (X @ torch.tensor([1.0, -2.0, 0.5], dtype=D)).unsqueeze(1)


def loss(p, h, b):
    return ((b[0] @ p["w"] - b[1]) ** 2).mean()


def problem(hparams=None, optimizer=None, params=None, **changes):
    kwargs = dict(train_data=(X, Y), val_data=(X, Y), steps=4)
    kwargs.update(changes)
    return hd.make_problem(kwargs.pop("train_loss", loss), kwargs.pop("val_loss", loss),
                           hparams or hd.HyperParameters(lr=hd.scalar(0.1)),
                           params or {"w": torch.zeros(3, 1, dtype=D)},
                           optimizer=optimizer or hd.sgd("lr"), **kwargs)


# --- item 1: two schedules left at the default prefix ---------------------------------------

def test_two_schedules_sharing_hyperparameters_are_refused():
    lr, wd = hd.schedule("warmup_cosine", 4), hd.schedule("exponential", 4)
    hp = hd.HyperParameters(**lr.hyperparameters(peak=0.1, warmup=0.2, final=0.5))
    with pytest.raises(hd.HyperdiffError) as info:
        problem(hp, hd.adamw(lr, weight_decay=wd))
    text = str(info.value)
    assert text.startswith("make_problem: the schedules of lr and weight_decay must read "
                           "hyperparameters of their own"), text
    assert "['lr_peak', 'lr_final']" in text and "prefix=" in text


def test_schedules_with_their_own_prefixes_train_as_written_out():
    """The control: prefixes keep them apart; the weight decay is peak * final ** s."""
    lr, wd = hd.schedule("exponential", 4), hd.schedule("exponential", 4, prefix="wd")
    hp = hd.HyperParameters(**lr.hyperparameters(peak=0.1, final=0.5),
                            **wd.hyperparameters(peak=0.01, final=0.2))
    p = problem(hp, hd.adamw(lr, weight_decay=wd))
    assert [round(float(v), 12) for v in wd.values(hp)] == [
        round(0.01 * 0.2 ** (t / 3), 12) for t in range(4)]
    assert set(hd.reverse()(p).grad_natural) == {"lr_peak", "lr_final", "wd_peak", "wd_final"}


def test_lightning_schedules_sharing_hyperparameters_are_refused():
    module = nn.Linear(3, 1).double()
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    lr, wd = hd.schedule("exponential", 4), hd.schedule("exponential", 4)
    hp = hd.HyperParameters(**lr.hyperparameters())
    with pytest.raises(hd.HyperdiffError, match=r"^trainer: the schedules of lr and "
                       r"weight_decay must read hyperparameters of their own"):
        inner_optimizer(opt, hp, dict(module.named_parameters()), "trainer",
                        {"lr": lr, "weight_decay": wd})


# --- item 2: per_element / per_tensor read in a loss ----------------------------------------

def l2_loss(p, h, b):
    return loss(p, h, b) + (h.at("l2", param="w") * p["w"] ** 2).sum()


def test_per_element_read_in_the_loss_must_have_the_parameter_shape():
    hp = hd.HyperParameters(lr=hd.scalar(0.1),
                            l2=hd.per_element({"w": torch.zeros(1, 3, dtype=D)}, 0.01))
    with pytest.raises(hd.HyperdiffError) as info:
        problem(hp, params={"w": torch.zeros(4, 3, dtype=D)}, train_loss=l2_loss,
                train_data=(X, X.new_zeros(12, 4)), val_data=(X, X.new_zeros(12, 4)),
                val_loss=lambda p, h, b: ((b[0] @ p["w"].T - b[1]) ** 2).mean())
    text = str(info.value)
    assert text.startswith("make_problem: per_element hyperparameter 'l2' must have the shape "
                           "of parameter 'w', (4, 3) (got (1, 3)"), text


def test_per_tensor_over_an_unknown_parameter_is_refused():
    hp = hd.HyperParameters(lr=hd.scalar(0.1), l2=hd.per_tensor(
        {"w": torch.zeros(3, 1, dtype=D), "extra": torch.zeros(2, dtype=D)}, 0.01))
    with pytest.raises(hd.HyperdiffError) as info:
        problem(hp, train_loss=lambda p, h, b: loss(p, h, b)
                + h.at("l2", param="w") * p["w"].square().sum())
    text = str(info.value)
    assert text.startswith("make_problem: per_tensor hyperparameter 'l2' must be made over "
                           "trained parameters, some of ['w'] (got unknown ['extra']"), text


def test_per_element_over_a_subset_of_the_parameters_is_accepted():
    """The control: a penalty on the weight only, not the bias, is a legitimate use; its
    hypergradient matches central differences."""
    params = {"w": torch.zeros(3, 1, dtype=D), "b": torch.zeros(1, dtype=D)}

    def fit(p, h, b):
        return ((b[0] @ p["w"] + p["b"] - b[1]) ** 2).mean()

    def train(p, h, b):
        return fit(p, h, b) + (h.at("l2", param="w") * p["w"] ** 2).sum()

    hp = hd.HyperParameters(l2=hd.per_element({"w": params["w"]}, 0.05))
    p = hd.make_problem(train, fit, hp, params, optimizer=hd.sgd(0.1), train_data=(X, Y),
                        val_data=(X, Y), steps=4)
    grad = hd.reverse()(p).grad["l2"]
    raw, eps = hp.raw["l2"], 1e-6
    for i in range(3):
        up, down = raw.clone(), raw.clone()
        up[i] += eps
        down[i] -= eps
        fd = (hd.reverse()(p, {"l2": up}).value - hd.reverse()(p, {"l2": down}).value) / (2 * eps)
        assert abs(float(grad[i]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


# --- item 3: the failing step of the start-up check, a one-row BatchNorm batch ----------------

def test_startup_failure_names_the_failing_step_and_its_batch():
    batches = [(X[:4], Y[:4]), (X[:3, :2], Y[:3])]  # step 1's batch has 2 features, not 3
    with pytest.raises(hd.HyperdiffError) as info:
        problem(train_data=batches)
    text = str(info.value)
    assert text.startswith("make_problem: the losses or the optimizer failed at step 1 "), text
    assert "train batch of step 1: batch[0] (3, 2) float64, batch[1] (3, 1) float64;" in text


def bn_net():
    torch.manual_seed(0)
    return hd.functional(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
                         .double())


def test_one_row_batchnorm_batch_is_refused_without_a_torch_warning():
    net = bn_net()

    def bn_loss(p, h, b, ctx):
        return ((net(p, b[0], ctx) - b[1]) ** 2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # var()'s "degrees of freedom <= 0" leaked before
        with pytest.raises(hd.HyperdiffError) as info:
            problem(params=net, train_loss=bn_loss, val_loss=bn_loss,
                    train_data=[(X[:4], Y[:4]), (X[4:5], Y[4:5])])
    text = str(info.value)
    assert text.startswith("functional model: BatchNorm '1' must see more than one value per "
                           "channel in training (got an input of shape (1, 4) at step 1)"), text
    assert "drop_last=True" in text


def test_batchnorm_with_two_rows_per_batch_still_trains():
    """The control: two rows per channel are normalised as torch does."""
    net = bn_net()

    def bn_loss(p, h, b, ctx):
        return ((net(p, b[0], ctx) - b[1]) ** 2).mean()

    p = problem(params=net, train_loss=bn_loss, val_loss=bn_loss,
                train_data=[(X[:4], Y[:4]), (X[4:6], Y[4:6])])
    assert torch.isfinite(torch.tensor(hd.reverse()(p).value))


# --- item 4: the caller in messages ---------------------------------------------------------

def test_make_problem_names_itself():
    with pytest.raises(hd.HyperdiffError, match=r"^make_problem: steps must be a positive int "
                       r"\(got 0\)"):
        problem(steps=0)
    with pytest.raises(hd.HyperdiffError, match=r"^make_problem: the losses or the optimizer "
                       r"failed at step 0"):
        problem(train_data=(X[:, :2], Y))


def test_hypergradient_keeps_its_name():
    """A control that passes before: hd.hypergradient passes caller="hypergradient"."""
    with pytest.raises(hd.HyperdiffError, match=r"^hypergradient: steps must be a positive int "
                       r"\(got 0\)"):
        hd.hypergradient(loss, loss, hd.HyperParameters(lr=hd.scalar(0.1)),
                         {"w": torch.zeros(3, 1, dtype=D)}, optimizer=hd.sgd("lr"),
                         train_data=(X, Y), val_data=(X, Y), steps=0)


def test_a_caller_names_the_entry_point():
    with pytest.raises(hd.HyperdiffError, match=r"^mytask: the losses or the optimizer failed"):
        problem(train_data=(X[:, :2], Y), caller="mytask")


# --- item 5: a torch loss module as a loss --------------------------------------------------

def test_a_loss_module_is_judged_by_its_forward():
    with pytest.raises(hd.HyperdiffError) as info:
        problem(train_loss=nn.MSELoss())
    text = str(info.value)
    assert text.startswith("make_problem: train_loss must accept (params, hparams, batch) or "
                           "(params, hparams, batch, ctx) (got a MSELoss module whose forward "
                           "takes 2 arguments"), text


def test_a_module_whose_forward_takes_a_loss_arguments_is_accepted():
    """The control: a module with forward(params, hparams, batch) is a loss."""

    class Loss(nn.Module):
        def forward(self, p, h, b):
            return F.mse_loss(b[0] @ p["w"], b[1])

    got = hd.reverse()(problem(train_loss=Loss(), val_loss=Loss())).value
    want = hd.reverse()(problem()).value
    assert got == want


# --- item 6: sparse parameters --------------------------------------------------------------

def test_a_sparse_parameter_is_refused():
    with pytest.raises(hd.HyperdiffError, match=r"^make_problem: params\['w'\] must be a dense "
                       r"\(strided\) tensor \(got layout sparse_coo\)"):
        problem(params={"w": torch.zeros(3, 1, dtype=D).to_sparse()})
