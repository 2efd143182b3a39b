"""Online ``method="curvature"`` with learning rates other than a schedule: a per-tensor
hyperparameter, a scalar one, a callable coefficient, and a constant (float64, zero Hessian so
that RTHO is the exact reference)."""

from __future__ import annotations

import pytest
import torch
from test_online import mlp_params, val_loss
from test_online_curvature import linear_train_loss

import hyperdiff as hd

from conftest import sine_data

# the deprecated shim is what these tests exercise (they predate the one loop)
pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")


def tuned(lr, hparams, momentum=0.5, steps=8):
    x, y = sine_data(24, 5, seed=1)
    xv, yv = sine_data(16, 5, seed=2)
    return hd.make_problem(linear_train_loss, val_loss, hparams, mlp_params(),
                           optimizer=hd.sgd(lr, momentum),
                           train_data=hd.minibatches(x, y, batch_size=6), val_data=(xv, yv),
                           steps=steps, seed=0, probe=False)


def per_tensor_lr():
    values = {"W1": 0.1, "b1": 0.3, "W2": 0.05}
    return "lr", hd.HyperParameters(lr=hd.per_tensor(mlp_params(), values))


def scalar_lr():
    return "lr", hd.HyperParameters(lr=hd.scalar(0.2))


def callable_lr():
    def decayed(h, step, param):
        scale = 2.0 if param == "b1" else 1.0
        return scale * h["lr"] / (1.0 + 0.1 * step)
    return decayed, hd.HyperParameters(lr=hd.scalar(0.2))


def constant_lr():
    return 0.1, hd.HyperParameters(m=hd.scalar(0.3))


@pytest.mark.parametrize("make", [per_tensor_lr, scalar_lr, callable_lr])
def test_learning_rates_of_every_kind_equal_rtho_with_a_zero_hessian(make):
    lr, hparams = make()
    prob = tuned(lr, hparams)
    ours = hd.online.OnlineTuner(prob, window=4, method="curvature", lr=0.0, horizon=None,
                          curvature_scale=0.0).run().history
    rtho = hd.online.OnlineTuner(prob, window=4, method="forward", lr=0.0).run().history
    for a, b in zip(ours, rtho, strict=True):
        for name, g in b.grad.items():
            assert torch.allclose(torch.as_tensor(a.grad[name], dtype=torch.float64),
                                  torch.as_tensor(g, dtype=torch.float64), rtol=1e-10,
                                  atol=1e-12), (name, a.grad, b.grad)
    assert max(abs(float(torch.as_tensor(v).abs().max())) for v in ours[-1].grad.values()) > 1e-4


def test_a_constant_learning_rate_carries_nothing_and_gives_the_one_step_signal():
    lr, hparams = constant_lr()
    prob = tuned(lr, hparams, momentum="m")
    record = hd.online.OnlineTuner(prob, window=4, method="curvature", lr=0.0).step()
    reverse = hd.online.OnlineTuner(prob, window=4, method="reverse", backprop=1, lr=0.0).step()
    assert record.grad["m"] == pytest.approx(reverse.grad["m"], rel=1e-12)


def test_a_learning_rate_per_element_is_refused_with_a_clear_error():
    per_element = hd.HyperParameters(lr=hd.per_element(mlp_params(), 0.1))
    with pytest.raises(hd.HyperdiffError, match="got the per_element hyperparameter 'lr'"):
        hd.online.OnlineTuner(tuned("lr", per_element), window=4, method="curvature")

    def elementwise(h, step, param):
        return h["lr"] * torch.ones(3)

    tuner = hd.online.OnlineTuner(tuned(elementwise, hd.HyperParameters(lr=hd.scalar(0.1))), window=4,
                           method="curvature")
    with pytest.raises(hd.HyperdiffError, match=r"gave a tensor of shape \(3,\)"):
        tuner.step()
