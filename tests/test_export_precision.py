"""What "the exported optimizer trains as hd.testing.train" means, precisely (docs/export.md):

- given identical gradients, the torch.optim step equals the inner optimizer's update bit for
  bit when every coefficient is a plain number, in float32 and float64;
- with hyperparameter (tensor) coefficients each step differs by the rounding of its last
  operations (a product and a difference instead of torch's fused kernel);
- a module trained by ``loss.backward()`` then sees parameters that differ by rounding, so its
  gradients do too; Adam turns the rounding noise of a gradient whose true value is zero (a bias
  just before a BatchNorm) into steps of order lr in float32 (noise ~ eps = 1e-8), not in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_export import train_with_torch

import hyperdiff as hd

SHAPES = {"w": (7, 5), "b": (5,)}
NO_HPARAMS = hd.HyperParameters(unused=hd.scalar(1.0))
CONSTANT = {
    "sgd_nesterov": hd.sgd(0.05, 0.9, nesterov=True, weight_decay=1e-3),
    "sgd_dampening": hd.sgd(0.05, 0.8, dampening=0.3),
    "adam": hd.adam(1e-2, betas=(0.8, 0.99), weight_decay=1e-3),
    "adamw": hd.adamw(1e-2),
}


def steps_on_the_same_gradients(optimizer, hparams, dtype, steps=20):
    """Largest |torch.optim - hd| over ``steps`` steps fed the same random gradients, and the
    largest |parameter| (the scale of one rounding)."""
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_opt, scheduler = hd.torch_optimizer(optimizer, hparams, leaves)
    state, view = optimizer.init(params), hparams.view(hparams.raw)
    worst = scale = 0.0
    for step in range(steps):
        grads = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
        with torch.no_grad():
            params, state = optimizer.update(grads, state, params, view, step)
        for name, leaf in leaves.items():
            leaf.grad = grads[name].clone()
        torch_opt.step()
        scheduler.step()
        for name, leaf in leaves.items():
            worst = max(worst, float((leaf.detach() - params[name]).abs().max()))
            scale = max(scale, float(params[name].abs().max()))
    return worst, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONSTANT))
def test_given_identical_gradients_the_torch_step_is_bit_for_bit(name, dtype):
    worst, _ = steps_on_the_same_gradients(CONSTANT[name], NO_HPARAMS, dtype)
    assert worst == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_coefficients_agree_to_rounding(dtype):
    hparams = hd.HyperParameters(lr=hd.scalar(0.05), mom=hd.scalar(0.9, (0.0, 1.0)),
                                 wd=hd.scalar(1e-3))
    worst, scale = steps_on_the_same_gradients(hd.sgd("lr", "mom", weight_decay="wd"), hparams,
                                               dtype)
    assert worst <= 8 * torch.finfo(dtype).eps * scale


def batch_norm_net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def adam_before_batch_norm(dtype: torch.dtype, steps: int = 50, *, constant: bool = False):
    """(hd.testing.train's params, the module trained by loss.backward() with the export, inputs);
    lr a per-step hyperparameter from 1e-2 to 1e-3, or the constant 1e-2."""
    module = batch_norm_net(dtype)
    net = hd.functional(module)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen, dtype=dtype)
    y = torch.randn(64, 3, generator=gen, dtype=dtype)

    def loss(p, h, batch, ctx):
        return F.mse_loss(net(p, batch[0], ctx), batch[1])

    lr = torch.linspace(1e-2, 1e-3, steps, dtype=torch.float64)
    hparams = hd.HyperParameters(lr=hd.per_step(steps, lr))
    optimizer = hd.adam(1e-2) if constant else hd.adam("lr")
    problem = hd.make_problem(loss, loss, hparams, net.params, buffers=net.buffers,
                              optimizer=optimizer, train_data=hd.minibatches(x, y,
                                                                                 batch_size=16),
                              val_data=(x, y), steps=steps, probe=False)
    state, _ = hd.testing.train(problem)
    retrained = batch_norm_net(dtype)
    torch_opt, scheduler = hd.torch_optimizer(problem.optimizer, hparams, retrained)
    train_with_torch(retrained, problem, torch_opt, scheduler, steps)
    return state.params, retrained, x


def differences(params, module) -> dict[str, float]:
    return {k: float((p.detach() - params[k]).abs().max()) for k, p in module.named_parameters()}


def test_float32_constant_coefficients_give_the_same_run_bit_for_bit():
    """Same parameters, batch and loss: loss.backward() gives the functional gradients' bits,
    even the pure-noise gradient of the bias before the BatchNorm."""
    params, retrained, _ = adam_before_batch_norm(torch.float32, constant=True)
    assert differences(params, retrained) == dict.fromkeys(params, 0.0)


def test_float32_adam_amplifies_rounding_only_where_the_true_gradient_is_zero():
    params, retrained, x = adam_before_batch_norm(torch.float32)
    diff = differences(params, retrained)
    # the bias before the BatchNorm: its gradient is rounding noise (~1e-8, Adam's eps)
    assert 1e-4 < diff.pop("0.bias") < 50 * 1e-2  # at most sum_t lr_t-ish per coordinate
    assert max(diff.values()) < 1e-6  # every other parameter: float32 rounding
    hd.load_into(module := batch_norm_net(torch.float32), params)
    module.train()
    torch.testing.assert_close(retrained(x), module(x), rtol=0, atol=1e-5)  # BN removes it


def test_float64_keeps_the_same_run_to_1e_9():
    params, retrained, _ = adam_before_batch_norm(torch.float64)
    diff = differences(params, retrained)
    assert diff.pop("0.bias") < 1e-9
    assert max(diff.values()) < 1e-14
