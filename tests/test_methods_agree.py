"""Reverse, forward and central finite differences agree, over a table of optimizers and
models: a tanh MLP with per-tensor weight decay, a learning-rate schedule and momentum; Adam;
and a model with BatchNorm and dropout trained on seeded minibatches."""

import pytest
import torch
from torch import nn

import hyperdiff as hd

from conftest import decayed_mse_losses, quiet, rel_err, sine_data

STEPS = 8


_data = sine_data


def _mlp(batchnorm: bool = False, dropout: float = 0.0) -> hd.FunctionalModel:
    torch.manual_seed(1)
    layers: list[nn.Module] = [nn.Linear(5, 7)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(7))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(7, 1))
    return hd.functional(nn.Sequential(*layers).double())


def _problem(net, hparams, optimizer, train_data):
    train_loss, val_loss = decayed_mse_losses(net)
    return hd.make_problem(
        train_loss, val_loss, hparams, net.params, buffers=net.buffers, optimizer=optimizer,
        train_data=train_data, val_data=_data(16, seed=1), steps=STEPS, seed=3,
    )


def _case(name):
    if name == "sgd_momentum_schedule":
        net = _mlp()
        hp = hd.HyperParameters(
            wd=hd.per_tensor(net.params, 1e-2),
            lr=hd.per_step(STEPS, [0.2 - 0.01 * t for t in range(STEPS)]),
            mom=hd.scalar(0.8, (0.0, 1.0)),
        )
        return _problem(net, hp, hd.sgd("lr", "mom"), _data())
    if name == "nesterov":
        net = _mlp()
        hp = hd.HyperParameters(wd=hd.per_tensor(net.params, 1e-2), lr=hd.scalar(0.1),
                                mom=hd.scalar(0.7, (0.0, 1.0)))
        return _problem(net, hp, hd.sgd("lr", "mom", nesterov=True), _data())
    if name == "adam":
        net = _mlp()
        hp = hd.HyperParameters(
            wd=hd.per_tensor(net.params, 1e-2), lr=hd.scalar(0.05),
            b1=hd.scalar(0.85, (0.0, 1.0)), b2=hd.scalar(0.99, (0.0, 1.0)),
            eps=hd.scalar(1e-3),
        )
        return _problem(net, hp, hd.adam("lr", betas=("b1", "b2"), eps="eps"), _data())
    if name == "adamw_decoupled":
        net = _mlp()
        hp = hd.HyperParameters(wd=hd.per_tensor(net.params, 1e-2), lr=hd.scalar(0.05),
                                dwd=hd.scalar(0.1))
        return _problem(net, hp, hd.adamw("lr", weight_decay="dwd"), _data())
    if name == "batchnorm_dropout_minibatch":
        net = _mlp(batchnorm=True, dropout=0.2)
        hp = hd.HyperParameters(wd=hd.per_tensor(net.params, 1e-2), lr=hd.per_step(STEPS, 0.1),
                                mom=hd.scalar(0.9, (0.0, 1.0)))
        x, y = _data(32)
        return _problem(net, hp, hd.sgd("lr", "mom"), hd.minibatches(x, y, batch_size=8))
    if name == "per_element_decay":
        net = hd.functional(nn.Linear(5, 1).double())
        hp = hd.HyperParameters(el=hd.per_element(net.params, 1e-2), lr=hd.scalar(0.1))

        def l2(p, h, batch, ctx):
            x, y = batch
            fit = ((net(p, x) - y) ** 2).mean()
            return fit + sum((h.at("el", param=k) * v**2).sum() for k, v in p.items())

        def val(p, h, batch, ctx):
            x, y = batch
            return ((net(p, x) - y) ** 2).mean()

        return hd.make_problem(l2, val, hp, net.params, optimizer=hd.sgd("lr", 0.5),
                               train_data=_data(), val_data=_data(16, seed=1), steps=STEPS)
    raise KeyError(name)


CASES = ["sgd_momentum_schedule", "nesterov", "adam", "adamw_decoupled",
         "batchnorm_dropout_minibatch", "per_element_decay"]


@pytest.mark.parametrize("case", CASES)
def test_reverse_forward_and_finite_differences_agree(case):
    problem = _case(case)
    rev = hd.reverse()(problem)
    fwd = hd.forward(engine="jvp")(problem)
    two_vjps = hd.forward(engine="double_vjp")(problem)
    fd = quiet(hd.finite_difference(), problem)
    assert rev.value == pytest.approx(fd.value, rel=1e-12)
    assert rel_err(fwd.vector, rev.vector) <= 1e-10
    assert rel_err(two_vjps.vector, rev.vector) <= 1e-10
    assert two_vjps.value == pytest.approx(rev.value, rel=1e-12)
    assert rel_err(rev.vector, fd.vector) <= 1e-6
    assert rel_err(fwd.vector, fd.vector) <= 1e-6
    # every hyperparameter really moves the loss (the test is not vacuous)
    assert all(float(g.abs().max()) > 0 for g in rev.grad.values())


def test_batchnorm_buffers_carry_their_dependence_on_hyperparameters():
    """With BatchNorm in eval mode the validation loss depends on lam through the running
    statistics; dropping that path would break agreement with finite differences."""
    problem = _case("batchnorm_dropout_minibatch")
    rev = hd.reverse()(problem)
    assert set(rev.buffers) == {"1.running_mean", "1.running_var"}
    fd = quiet(hd.finite_difference(coordinates=[0, 6]), problem)
    flat = rev.vector
    assert flat[0].item() == pytest.approx(fd.vector[0].item(), rel=1e-6)
    assert flat[6].item() == pytest.approx(fd.vector[6].item(), rel=1e-6)


def test_forward_chunked_equals_unchunked():
    problem = _case("adam")
    full = hd.forward(engine="jvp")(problem)
    chunked = hd.forward(chunk_size=2, engine="jvp")(problem)
    assert rel_err(chunked.vector, full.vector) <= 1e-12


def test_forward_double_vjp_chunks_and_falls_back_to_jvp(monkeypatch):
    import importlib

    forward_module = importlib.import_module("hyperdiff.methods.forward")
    problem = _case("adam")
    full = hd.forward()(problem)
    assert full.diagnostics["engine"] == "double_vjp"
    chunked = hd.forward(chunk_size=3)(problem)
    assert rel_err(chunked.vector, full.vector) <= 1e-12

    def missing(*args, **kwargs):
        raise RuntimeError("the derivative for 'aten::something' is not implemented")

    monkeypatch.setattr(forward_module, "_unroll_double_vjp", missing)
    fallback = hd.forward()(problem)
    assert fallback.diagnostics["engine"] == "jvp"
    assert rel_err(fallback.vector, full.vector) <= 1e-10
    with pytest.raises(RuntimeError, match="not implemented"):
        hd.forward(engine="double_vjp")(problem)
    with pytest.raises(hd.HyperdiffError, match="engine must be one of"):
        hd.forward(engine="dual")


def test_replay_is_deterministic_under_dropout():
    problem = _case("batchnorm_dropout_minibatch")
    a, b = hd.testing.train(problem)[1], hd.testing.train(problem)[1]
    assert torch.equal(a, b)
    other_seed = hd.make_problem(
        problem.train_loss, problem.val_loss, problem.hparams, problem.params,
        buffers=problem.buffers, optimizer=problem.optimizer, train_data=problem.train_data,
        val_data=problem.val_data, steps=STEPS, seed=4,
    )
    assert not torch.equal(a, hd.testing.train(other_seed)[1])
