"""Modules hyperdiff must run exactly or refuse: checks of ``hd.functional`` and its calls.

Covered:

- refused when wrapped, naming the submodule: ``nn.Embedding(max_norm=...)`` (in-place
  renormalization), torch's weight norm (both APIs; wrong double backward), uninitialized
  lazy modules; a hand-written weight norm, the suggested replacement, matches finite
  differences;
- a module that reads ``self.training`` and returns a dataclass or a plain object, called
  without ``ctx`` in training, is refused (not trained in eval mode); a dataclass output that
  does not depend on the mode is accepted;
- a module whose own ``train()`` keeps its dropout in eval is accepted without ``ctx`` and
  trains as ``torch.optim`` does;
- BatchNorm running statistics under ``torch.autocast`` (bf16) and of an fp16 model match
  torch's BatchNorm to rounding;
- ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention(need_weights=False)``
  (scaled dot-product attention), called with and without ``ctx``: reverse hypergradients
  match finite differences;
- ``hd.forward(engine="jvp")`` on ``F.mse_loss`` (torch's read-only zero tangents) gives a
  HyperdiffError naming ``engine='double_vjp'``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import hyperdiff as hd
from hyperdiff.engine.models import StepContext


def _hypergradients(net, x, y, methods, steps=3, with_ctx=False):
    """Hypergradients of (lr, wd) by each method on one full-batch problem; the losses call
    ``net(p, x, ctx)`` when ``with_ctx``, else ``net(p, x)``."""
    def val_loss(p, h, b, ctx):
        return F.mse_loss(net(p, b[0], ctx) if with_ctx else net(p, b[0]), b[1])

    def train_loss(p, h, b, ctx):
        return val_loss(p, h, b, ctx) + h["wd"] * sum(v.square().sum() for v in p.values())

    hp = hd.HyperParameters(lr=hd.scalar(0.1), wd=hd.scalar(1e-3))
    return [hd.hypergradient(train_loss, val_loss, hp, net, method=method,
                             optimizer=hd.sgd("lr", 0.9), train_data=(x, y),
                             val_data=(x, y), steps=steps).grad for method in methods]


def _assert_grads_close(got, want, rtol=1e-6):
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=1e-10)


# --- refused when wrapped ---------------------------------------------------------------


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 5, max_norm=1.0)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.emb(x).mean(1))


def test_embedding_max_norm_is_refused_naming_the_submodule():
    module = _Embed()
    before = module.emb.weight.detach().clone()
    with pytest.raises(hd.HyperdiffError, match=r"'emb' \(Embedding\) must not set max_norm"):
        hd.functional(module)
    assert torch.equal(module.emb.weight, before)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()


@pytest.mark.parametrize("api", ["parametrizations", "old"])
def test_torch_weight_norm_is_refused(api):
    module = _mlp()
    if api == "parametrizations":
        parametrizations.weight_norm(module[0])
    else:
        with pytest.warns(FutureWarning):
            nn.utils.weight_norm(module[0])
    with pytest.raises(hd.HyperdiffError, match=r"submodule '0' .*weight norm.*by hand"):
        hd.functional(module)


class _HandWeightNorm(nn.Module):
    """The replacement the refusal suggests."""

    def forward(self, g, v):
        return g * v / v.norm(dim=1, keepdim=True)

    def right_inverse(self, w):
        return w.norm(dim=1, keepdim=True), w


def test_hand_written_weight_norm_matches_finite_differences():
    module = _mlp()
    parametrize.register_parametrization(module[0], "weight", _HandWeightNorm())
    net = hd.functional(module)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    reverse, fd = _hypergradients(net, x, y, [hd.reverse(), hd.finite_difference(warn=False)])
    _assert_grads_close(reverse, fd)


def test_uninitialized_lazy_module_is_refused_until_one_forward_pass():
    module = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 4))
    with pytest.raises(hd.HyperdiffError, match=r"'0' \(LazyLinear\).*one forward pass"):
        hd.functional(module)
    module(torch.zeros(2, 3))
    assert set(hd.functional(module).params) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# --- the training / eval mode of a call without ctx --------------------------------------


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor


class _Boxed:
    def __init__(self, logits):
        self.logits = logits


class _DropoutInForward(nn.Module):
    """F.dropout on self.training, the result wrapped by ``box``."""

    def __init__(self, box, p=0.5):
        super().__init__()
        self.layer, self.box, self.p = nn.Linear(4, 4), box, p

    def forward(self, x):
        return self.box(F.dropout(self.layer(x), self.p, self.training))


def _make_problem(net, x, y, **kw):
    def loss(p, h, b):
        return F.mse_loss(net(p, b[0]).logits, b[1])

    return hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.1)), net,
                           optimizer=hd.sgd("lr"), train_data=(x, y), val_data=(x, y),
                           steps=2, **kw)


@pytest.mark.parametrize("box", [_Output, _Boxed], ids=["dataclass", "plain_object"])
def test_output_object_reading_self_training_without_ctx_is_refused(box):
    net = hd.functional(_DropoutInForward(box))
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(hd.HyperdiffError, match="net\\(params, x, ctx\\)"):
        _make_problem(net, x, y)


def test_dataclass_output_independent_of_the_mode_is_accepted():
    net = hd.functional(_DropoutInForward(_Output, p=0.0))
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    state, _ = hd.testing.train(_make_problem(net, x, y))
    assert torch.isfinite(state.params["layer.weight"]).all()


class _EvalDropout(nn.Module):
    """A module whose own ``train`` keeps its dropout in eval: it never drops, as in torch."""

    def __init__(self):
        super().__init__()
        self.layer, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

    def train(self, mode=True):
        super().train(mode)
        self.drop.eval()
        return self

    def forward(self, x):
        return self.drop(self.layer(x))


@pytest.mark.filterwarnings("ignore:hypergradient. hyperparameter 'lr' never reaches")
def test_dropout_kept_in_eval_by_the_module_trains_without_ctx_as_torch():
    torch.manual_seed(1)
    module = _EvalDropout().eval()
    reference = copy.deepcopy(module).train()
    net = hd.functional(module)
    assert not module.training and not module.drop.training  # its modes are put back
    x, y = torch.randn(8, 4), torch.randn(8, 4)

    def loss(p, h, b):
        return F.mse_loss(net(p, b[0]), b[1])

    problem = hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.1)), net,
                              optimizer=hd.sgd(0.1), train_data=(x, y), val_data=(x, y),
                              steps=3)
    state, _ = hd.testing.train(problem)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(reference(x), y).backward()
        opt.step()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(state.params[name], param.detach(), rtol=0, atol=0)


# --- BatchNorm running statistics in low precision ----------------------------------------


@pytest.mark.filterwarnings("ignore:hypergradient. hyperparameter 'lr' never reaches")
def test_batchnorm_running_stats_under_autocast_match_torch():
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4))
    reference = copy.deepcopy(module)
    net = hd.functional(module)
    x, y = torch.randn(16, 4), torch.randn(16, 4)

    def loss(p, h, b, ctx):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.mse_loss(net(p, b[0], ctx).float(), b[1])

    problem = hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.5)), net,
                              optimizer=hd.sgd(0.5), train_data=(x, y), val_data=(x, y),
                              steps=5)
    state, _ = hd.testing.train(problem)
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.mse_loss(reference(x).float(), y).backward()
        opt.step()
    for name in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(state.buffers[name], reference.get_buffer(name),
                                   rtol=4e-7, atol=1e-8)


def test_batchnorm_running_stats_of_an_fp16_model_match_torch():
    bn = nn.BatchNorm1d(4, momentum=0.3).half()
    bn.running_mean.normal_().mul_(0.5)
    bn.running_var.uniform_(0.5, 2.0)
    net = hd.functional(bn)
    x = (torch.randn(16, 4) * 3 + 1).half()
    ctx = StepContext(step=0, seed=0, train=True, buffers=dict(net.buffers))
    net(net.params, x, ctx)
    bn(x)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(ctx.new_buffers[name], bn.get_buffer(name), rtol=0, atol=0)


# --- scaled dot-product attention ---------------------------------------------------------


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("make", [
    lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
    _SelfAttention,
], ids=["TransformerEncoderLayer", "MultiheadAttention"])
@pytest.mark.parametrize("with_ctx", [True, False], ids=["ctx", "no_ctx"])
def test_attention_hypergradient_matches_finite_differences(make, with_ctx):
    torch.manual_seed(1)
    module = make().double()
    net = hd.functional(module)
    x, y = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64)
    with torch.no_grad():  # torch's default backend
        expected = module(x)
    # with grad enabled the math backend runs: the same output to rounding
    torch.testing.assert_close(net(net.params, x).detach(), expected, rtol=1e-12, atol=1e-12)
    methods = [hd.reverse(), hd.finite_difference(warn=False)]
    reverse, fd = _hypergradients(net, x, y, methods, steps=2, with_ctx=with_ctx)
    _assert_grads_close(reverse, fd)


# --- forward mode ------------------------------------------------------------------------


def test_jvp_engine_on_mse_loss_names_double_vjp():
    torch.manual_seed(1)
    net = hd.functional(_mlp())
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(hd.HyperdiffError, match="engine='double_vjp'"):
        _hypergradients(net, x, y, [hd.forward(engine="jvp")])
