"""Frozen parameters (``requires_grad=False``) stay fixed: in hd.testing.train, in every hypergradient
method, in the online windows and in export; they still act in the forward pass.

The reference is the same network written by hand with the frozen layer as a constant tensor
(its parameters are then simply not among the trained ones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hyperdiff as hd
from hyperdiff.engine.training import validation_loss

# the deprecated shim is what these tests exercise (they predate the one loop)
pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

STEPS = 8


def frozen_first_layer() -> torch.nn.Module:
    """Linear(3, 5) -> tanh -> Linear(5, 2) in float64 with the first layer frozen."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                                 torch.nn.Linear(5, 2)).double()
    module[0].requires_grad_(False)
    return module


def data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, torch.sin(x[:, :2]) + 0.1 * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def problems(module: torch.nn.Module) -> tuple[hd.Problem, hd.Problem]:
    """The module's problem, and the reference: the frozen layer written as constants."""
    net = hd.functional(module)
    weight, bias = module[0].weight.detach().clone(), module[0].bias.detach().clone()

    def by_hand(params, x):
        hidden = torch.tanh(x @ weight.T + bias)
        return hidden @ params["2.weight"].T + params["2.bias"]

    def make(forward, params):
        def train_loss(p, h, batch):
            decay = sum(v.square().sum() for v in p.values())
            return F.mse_loss(forward(p, batch[0]), batch[1]) + h["wd"] * decay

        def val_loss(p, h, batch):
            return F.mse_loss(forward(p, batch[0]), batch[1])

        hparams = hd.HyperParameters(lr=hd.scalar(0.2), wd=hd.scalar(1e-2))
        return hd.make_problem(train_loss, val_loss, hparams, params,
                               optimizer=hd.sgd("lr", 0.9), train_data=data(),
                               val_data=data(16), steps=STEPS, probe=False)

    reference_params = {k: module.get_parameter(k).detach().clone() for k in ("2.weight", "2.bias")}
    return make(lambda p, x: net(p, x), net.params), make(by_hand, reference_params)


def test_functional_params_leave_frozen_parameters_out():
    module = frozen_first_layer()
    net = hd.functional(module)
    assert sorted(net.params) == ["2.bias", "2.weight"]
    assert net.frozen == ("0.weight", "0.bias")


def test_train_keeps_the_frozen_layer_and_trains_as_with_constants():
    module = frozen_first_layer()
    start = {k: v.detach().clone() for k, v in module[0].named_parameters()}
    problem, reference = problems(module)
    state, _ = hd.testing.train(problem)
    want, _ = hd.testing.train(reference)
    assert sorted(state.params) == ["2.bias", "2.weight"]
    assert all(torch.equal(getattr(module[0], k), v) for k, v in start.items())
    for name, value in want.params.items():
        torch.testing.assert_close(state.params[name], value, rtol=0, atol=1e-14)
    assert not torch.equal(state.params["2.weight"], reference.params["2.weight"])  # it trained


METHODS = {
    "reverse": hd.reverse(),
    "forward": hd.forward(),
    "checkpointed": hd.checkpointed(3),
    "truncated": hd.truncated(3),
    "reversible": hd.reversible(),
    "implicit": hd.implicit("exact", warn=False),
    "finite_difference": hd.finite_difference(warn=False),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_differentiates_the_problem_with_the_frozen_layer_constant(name):
    module = frozen_first_layer()
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    problem, reference = problems(module)
    got = METHODS[name](problem)
    want = METHODS[name](reference)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in start.items())
    torch.testing.assert_close(got.value, want.value, rtol=1e-12, atol=0)
    tol = 1e-6 if name == "finite_difference" else 1e-10
    for key in want.grad:
        torch.testing.assert_close(got.grad[key], want.grad[key], rtol=tol, atol=1e-14)


def test_the_reference_hypergradient_agrees_with_a_float64_finite_difference():
    """The constant-layer reference itself checked against central differences of the
    validation loss after plain training (an oracle that differentiates nothing)."""
    module = frozen_first_layer()
    problem, _ = problems(module)
    got = hd.reverse()(problem)
    eps = 1e-5
    for name in ("lr", "wd"):
        raw = dict(problem.hparams.raw)
        losses = []
        for sign in (1.0, -1.0):
            shifted = {**raw, name: raw[name] + sign * eps}
            state, _ = hd.testing.train(problem, shifted)
            hview = problem.hparams.view(problem.raw_tensors(shifted))
            losses.append(float(validation_loss(problem, state.params, state.buffers, hview)))
        assert float(got.grad[name]) == pytest.approx((losses[0] - losses[1]) / (2 * eps),
                                                      rel=1e-6)


def test_torch_optimizer_exports_only_the_trainable_parameters_and_trains_like_torch():
    module = frozen_first_layer()
    twin = frozen_first_layer()
    hparams = hd.HyperParameters(lr=hd.scalar(0.1), momentum=hd.scalar(0.9, (0.0, 1.0)))
    torch_opt, scheduler = hd.torch_optimizer(hd.sgd("lr", "momentum"), hparams, module)
    exported = [p for group in torch_opt.param_groups for p in group["params"]]
    assert [id(p) for p in exported] == [id(module[2].weight), id(module[2].bias)]
    plain = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1,
                            momentum=0.9)
    x, y = data()
    for _ in range(5):
        for opt, net in ((torch_opt, module), (plain, twin)):
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
        scheduler.step()
    for (name, got), want in zip(module.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15, msg=name)
    assert torch.equal(module[0].weight, frozen_first_layer()[0].weight)


def test_exported_training_of_a_frozen_model_matches_hd_train():
    module = frozen_first_layer()
    problem, _ = problems(module)
    state, _ = hd.testing.train(problem)
    torch_opt, scheduler = hd.torch_optimizer(problem.optimizer, problem.hparams, module)
    x, y = data()
    wd = float(problem.hparams.natural()["wd"])
    for _ in range(STEPS):
        torch_opt.zero_grad()
        decay = sum(p.square().sum() for p in module.parameters() if p.requires_grad)
        (F.mse_loss(module(x), y) + wd * decay).backward()
        torch_opt.step()
        scheduler.step()
    for name, value in state.params.items():
        torch.testing.assert_close(module.get_parameter(name).detach(), value, rtol=0,
                                   atol=1e-12)
    hd.load_into(module, state.params)  # the trained params without the frozen ones load


def test_a_module_without_trainable_parameters_is_a_clear_error():
    module = frozen_first_layer().requires_grad_(False)
    with pytest.raises(hd.HyperdiffError, match="requires grad"):
        hd.torch_optimizer(hd.sgd(0.1), hd.HyperParameters(a=hd.scalar(1.0)), module)


@pytest.mark.parametrize("method", ["reverse", "forward", "curvature"])
def test_online_windows_keep_the_frozen_layer_and_match_the_constant_reference(method):
    module = frozen_first_layer()
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    problem, reference = problems(module)
    runs = [hd.online.OnlineTuner(p, window=4, method=method, lr=0.05) for p in (problem, reference)]
    histories = [tuner.run().history for tuner in runs]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in start.items())
    assert sorted(runs[0].state.params) == ["2.bias", "2.weight"]
    for got, want in zip(*histories, strict=True):
        for name, value in want.grad.items():
            assert got.grad[name] == pytest.approx(value, rel=1e-10, abs=1e-14)
    for name, value in runs[1].state.params.items():
        torch.testing.assert_close(runs[0].state.params[name], value, rtol=0, atol=1e-13)
