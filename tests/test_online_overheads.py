"""Exact savings in the online loop's per-step and per-window Python (issue 20 item 3): the
devices a training call seeds, the CPU-only seeded generator, the skipped ``train(mode)`` walk
and the guard's snapshot of the outer optimizer, each against the generic routine it replaces
(torch's pytree flatten, ``torch.random.fork_rng``, ``nn.Module.train``, ``copy.deepcopy``),
and an online run with dropout and BatchNorm that is bit for bit the run of those routines."""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict, namedtuple

import pytest
import torch
from test_driver import flaky, ridge_problem
from torch import nn

import hyperdiff as hd
from hyperdiff.engine import models
from hyperdiff.tree import tree_flatten
from hyperdiff.tuner import driver
from hyperdiff.tuner.driver import HyperOptimizer, copied_state
from hyperdiff.tuner.stopping import Stopping

Pair = namedtuple("Pair", "x y")


def flattened_devices(*trees):
    """The reference: every tensor leaf of torch's pytree flatten, accelerators only."""
    found = {x.device for x in tree_flatten(trees)[0] if isinstance(x, torch.Tensor)}
    return sorted((d for d in found if d.type not in ("cpu", "meta")), key=str)


TREES = [
    ({"w": torch.zeros(2)}, (torch.ones(3), torch.ones(3))),
    ({"a": [torch.zeros(1, device="meta"), (None, 3, "s", 1.5, True)]}, {}),
    (Pair(torch.zeros(1), torch.zeros(1, device="meta")), OrderedDict(b=torch.ones(1))),
    ([], (), None, "text", 7),
]


@pytest.mark.parametrize("trees", TREES)
def test_devices_walk_finds_the_leaves_of_torchs_flatten(trees):
    found: set[torch.device] = set()
    models._add_devices(trees, found)
    leaves = {x.device for x in tree_flatten(trees)[0] if isinstance(x, torch.Tensor)}
    assert found == leaves
    assert models._tensor_devices(*trees) == flattened_devices(*trees) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_devices_walk_finds_a_cuda_tensor_inside_a_namedtuple():
    trees = ({"w": torch.zeros(2)}, Pair(torch.zeros(1, device="cuda"), [torch.ones(1)]))
    assert models._tensor_devices(*trees) == flattened_devices(*trees)
    assert [d.type for d in models._tensor_devices(*trees)] == ["cuda"]


def test_cpu_seeded_generator_draws_from_the_seed_and_restores_the_global_state():
    torch.manual_seed(123)
    after = torch.rand(4)  # what the global generator gives next, untouched
    torch.manual_seed(123)
    seeds = iter([77])
    with models._seeded_rng(lambda: next(seeds), []):
        inside = torch.rand(5)
    assert torch.equal(inside, torch.rand(5, generator=torch.Generator().manual_seed(77)))
    assert torch.equal(torch.rand(4), after)
    torch.manual_seed(123)
    with pytest.raises(RuntimeError, match="boom"), models._seeded_rng(lambda: 5, []):
        torch.rand(3)
        raise RuntimeError("boom")
    assert torch.equal(torch.rand(4), after)


class KeepsNormFrozen(nn.Sequential):
    """A module whose ``train`` keeps its BatchNorm in eval mode (a common override)."""

    calls = 0

    def train(self, mode=True):
        KeepsNormFrozen.calls += 1
        super().train(mode)
        for sub in self.modules():
            if isinstance(sub, nn.BatchNorm1d):
                sub.eval()
        return self


def modes(module):
    return [sub.training for sub in module.modules()]


@pytest.mark.parametrize("mode", [True, False])
def test_set_training_leaves_every_module_as_train_would(mode):
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(0.1), nn.Linear(2, 1)))
    mixed[1].eval()
    reference = copy.deepcopy(mixed).train(mode)
    models._set_training(mixed, mode)
    assert modes(mixed) == modes(reference)
    models._set_training(mixed, mode)  # nothing to change: the walk is skipped
    assert modes(mixed) == modes(reference)


def test_set_training_calls_an_overridden_train_even_when_the_flags_agree():
    module = KeepsNormFrozen(nn.Linear(2, 2), nn.BatchNorm1d(2))
    module.train(True)
    before = KeepsNormFrozen.calls
    models._set_training(module, True)  # flags: [True, True, False], as train(True) leaves
    assert KeepsNormFrozen.calls == before + 1 and modes(module) == [True, True, False]


def adam_state():
    leaf = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    optimizer = torch.optim.Adam([leaf], lr=0.1, betas=(0.8, 0.9))
    for target in (1.0, 2.0):
        leaf.grad = leaf.detach() - target
        optimizer.step()
    return optimizer.state_dict()


def assert_same(copied, original):
    """Equal values and structure, and no tensor shared with ``original``."""
    assert type(copied) is type(original)
    if isinstance(original, dict):
        assert list(copied) == list(original)
        for k in original:
            assert_same(copied[k], original[k])
    elif isinstance(original, (list, tuple)):
        assert len(copied) == len(original)
        for a, b in zip(copied, original, strict=True):
            assert_same(a, b)
    elif isinstance(original, torch.Tensor):
        assert copied is not original and copied.untyped_storage().data_ptr() != (
            original.untyped_storage().data_ptr())
        assert copied.dtype == original.dtype and torch.equal(copied, original)
    else:
        assert copied == original


def test_copied_state_equals_deepcopy_and_shares_no_tensor():
    state = adam_state()
    copied = copied_state(state)
    assert_same(copied, copy.deepcopy(state))
    assert_same(copied, state)
    kept = copy.deepcopy(state)
    for tensor in state["state"][0].values():
        tensor.add_(1.0)  # the next outer step works in place
    assert_same(copied, kept)


def test_copied_state_leaves_what_it_cannot_copy_plainly_to_deepcopy():
    shared = torch.ones(2)
    twice = copied_state({"a": shared, "b": shared})  # deepcopy keeps the sharing
    assert twice["a"] is twice["b"] and twice["a"] is not shared
    marker = OrderedDict(x=torch.ones(1))
    other = copied_state({"m": marker})
    assert type(other["m"]) is OrderedDict and other["m"] is not marker
    graph = torch.ones(2, requires_grad=True)
    leaf = copied_state([graph])[0]
    assert leaf.requires_grad and leaf.is_leaf and leaf is not graph


def test_a_failed_step_restores_the_outer_adam_state_of_the_last_good_step():
    """The snapshot must not share Adam's moments, which the next step updates in place."""
    problem, _ = ridge_problem()
    opt = HyperOptimizer(problem, method=flaky({2}), lr=0.2, optimizer="adam",
                         schedule="constant", stopping=Stopping(max_steps=3, patience=None))
    states = []
    opt.run(callbacks=[lambda o, r: states.append(copy.deepcopy(o.optimizer.state_dict()))])
    assert [r.status for r in opt.history] == ["ok", "ok", "failed"]
    assert_same(opt.optimizer.state_dict(), states[0])  # before step 1, the last good one
    with pytest.raises(AssertionError):
        assert_same(states[1], states[0])


class NormDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.norm = nn.Linear(3, 6), nn.BatchNorm1d(6)
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.norm(self.inner(x)))))


def online_run():
    torch.manual_seed(0)
    net = hd.functional(NormDrop().double())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))

    def val_loss(p, h, batch, ctx):
        return ((net(p, batch[0], ctx) - batch[1]) ** 2).mean()

    def train_loss(p, h, batch, ctx):
        noise = 1 + 0.01 * torch.randn(())  # drawn outside the model: the loss's own seed
        return noise * val_loss(p, h, batch, ctx) + h["wd"] * sum(
            (v**2).sum() for v in p.values())

    problem = hd.make_problem(
        train_loss, val_loss, hd.HyperParameters(lr=hd.scalar(0.1), wd=hd.scalar(1e-2)),
        net, optimizer=hd.adam("lr"), steps=12, train_data=hd.minibatches(x[:30], y[:30],
                                                                          batch_size=8),
        val_data=(x[30:], y[30:]))
    loop = HyperOptimizer(problem, plan=hd.plans.OnlinePlan(window=3), optimizer="adam",
                          lr=0.05)
    return loop.run(), loop


def test_an_online_run_is_bit_for_bit_the_run_of_the_generic_routines(monkeypatch):
    fast, fast_loop = online_run()
    monkeypatch.setattr(models, "_tensor_devices", flattened_devices)
    monkeypatch.setattr(models, "_set_training", lambda module, mode: module.train(mode))
    monkeypatch.setattr(driver, "copied_state", copy.deepcopy)

    @contextlib.contextmanager
    def forked(next_seed, devices):
        """What ``_seeded_rng`` did for CPU-only calls before its fast path."""
        assert devices == []
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(next_seed())
            yield

    monkeypatch.setattr(models, "_seeded_rng", forked)
    slow, slow_loop = online_run()
    assert len(fast.history) == len(slow.history) == 4
    for a, b in zip(fast.history, slow.history, strict=True):
        assert (a.hparams, a.train_loss, a.val_loss, a.grad, a.status) == (
            b.hparams, b.train_loss, b.val_loss, b.grad, b.status)
    for name in fast.params:
        assert torch.equal(fast.params[name], slow.params[name]), name
    for name in fast.buffers:
        assert torch.equal(fast.buffers[name], slow.buffers[name]), name
    assert_same(fast_loop.optimizer.state_dict()["state"],
                slow_loop.optimizer.state_dict()["state"])
