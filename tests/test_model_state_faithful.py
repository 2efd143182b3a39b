"""hd.functional trains a module's state as torch does (s39): a BatchNorm that the model keeps
in eval mode (a frozen backbone) keeps its statistics; a buffer kept in another dtype than the
parameters keeps it; a module whose training forward pass updates buffers hyperdiff does not
carry (InstanceNorm's running statistics, a hand-written running mean) is refused instead of
being changed in place and replayed with other values. References: a torch.optim loop on the
module itself, and the module's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hyperdiff as hd


class FineTune(nn.Module):
    """A frozen backbone whose BatchNorm its own ``train()`` keeps in eval mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(8, 2)
        with torch.no_grad():  # "pretrained" statistics
            self.backbone[1].running_mean.fill_(0.5)
            self.backbone[1].running_var.fill_(2.0)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x):
        return self.head(self.backbone(x))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g) * 3 + 1
    return x, (x[:, 0] > 1).long()


def test_a_batch_norm_the_model_keeps_in_eval_mode_trains_as_in_torch():
    module = FineTune()
    net = hd.functional(copy.deepcopy(module))
    x, y = data()
    loss = lambda p, h, b, ctx: F.cross_entropy(net(p, b[0], ctx), b[1])  # noqa: E731
    problem = hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.1)), net,
                              optimizer=hd.sgd("lr", 0.9),
                              train_data=hd.minibatches(x, y, batch_size=16), val_data=(x, y),
                              steps=10)
    state, _ = hd.testing.train(problem)
    module.train()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    for step in range(10):
        xb, yb = problem.train_data.batch(step, problem.seed)
        opt.zero_grad()
        F.cross_entropy(module(xb), yb).backward()
        opt.step()
    assert torch.equal(state.buffers["backbone.1.running_mean"], torch.full((8,), 0.5))
    assert torch.equal(state.buffers["backbone.1.running_var"], torch.full((8,), 2.0))
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(state.params[name], module.get_parameter(name).detach(),
                                   rtol=1e-5, atol=1e-6)


class Offset(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2)
        self.register_buffer("offset", torch.tensor([1.0 + 1e-9] * 3, dtype=torch.float64))

    def forward(self, x):
        return self.fc((x.double() + self.offset).float())


def test_a_buffer_in_another_dtype_keeps_it():
    module = Offset()
    net = hd.functional(module)
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    assert torch.equal(net(net.params, x), module(x))
    assert module.offset.dtype == torch.float64


class RunningMean(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return x - self.mean


@pytest.mark.parametrize(("body", "names"), [
    (lambda: nn.Sequential(nn.Unflatten(1, (1, 5)), nn.InstanceNorm1d(1, track_running_stats=True),
                           nn.Flatten()), r"\['0.1.running_mean', '0.1.running_var'\]"),
    (lambda: RunningMean(5), r"\['0.mean'\]"),
])
def test_a_module_updating_buffers_hyperdiff_does_not_carry_is_refused(body, names):
    module = nn.Sequential(body(), nn.Linear(5, 2))
    before = copy.deepcopy(module.state_dict())
    net = hd.functional(module)
    x, y = data()
    loss = lambda p, h, b, ctx: F.cross_entropy(net(p, b[0], ctx), b[1])  # noqa: E731
    with pytest.raises(hd.HyperdiffError, match=rf"updates the buffers {names} in place; "
                       "hyperdiff carries BatchNorm's running statistics only"):
        hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.1)), net,
                        optimizer=hd.sgd("lr"), train_data=hd.minibatches(x, y, batch_size=16),
                        val_data=(x, y), steps=3)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # given back unchanged


def test_the_same_running_state_called_without_ctx_is_refused_too():
    """Without ctx the module would train in eval mode, its mean never updated: not torch's
    training either."""
    module = nn.Sequential(RunningMean(5), nn.Linear(5, 2))
    net = hd.functional(module)
    x, y = data()
    loss = lambda p, h, b: F.cross_entropy(net(p, b[0]), b[1])  # noqa: E731
    with pytest.raises(hd.HyperdiffError, match="computes another output in training mode"):
        hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.1)), net.params,
                        optimizer=hd.sgd("lr"), train_data=hd.minibatches(x, y, batch_size=16),
                        val_data=(x, y), steps=3)
    assert torch.equal(module[0].mean, torch.zeros(5))


class FunctionalDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.p = nn.Linear(5, 2), p

    def forward(self, x):
        return self.fc(F.dropout(x, self.p, self.training))


def dropout_problem(p: float):
    net = hd.functional(FunctionalDropout(p))
    x, y = data()
    loss = lambda params, h, b: F.cross_entropy(net(params, b[0]), b[1])  # noqa: E731
    return hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.1)), net.params,
                           optimizer=hd.sgd("lr"), train_data=hd.minibatches(x, y, batch_size=16),
                           val_data=(x, y), steps=3)


def test_dropout_drawn_in_forward_without_ctx_in_a_train_loss_is_refused():
    """Until s39 only dropout modules were found: F.dropout in forward trained in eval mode, its
    step-0 loss the eval-mode value."""
    with pytest.raises(hd.HyperdiffError, match="computes another output in training mode than "
                       "in eval mode .* train_loss must call it as net\\(params, x, ctx\\)"):
        dropout_problem(0.5)


def test_a_forward_that_reads_training_mode_to_the_same_effect_is_accepted():
    problem = dropout_problem(0.0)
    assert hd.reverse()(problem).value == hd.reverse()(problem).value
