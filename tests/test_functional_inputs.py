"""hd.functional with several inputs, keyword (dict) inputs, module tensors that the params do
not replace, and torch.compile'd modules."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hyperdiff as hd
from hyperdiff.engine.models import StepContext


def rel(a: hd.HyperGradient, b: hd.HyperGradient) -> float:
    return float((a.vector - b.vector).norm() / b.vector.norm())


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, xa, xb):
        return self.head(torch.tanh(self.a(xa) + self.b(xb)))


class KeywordInputs(nn.Module):
    """HuggingFace style: ``model(**batch)`` with keyword-only inputs, and dropout."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(3, 5), nn.Linear(5, 1)
        self.drop = nn.Dropout(0.3)

    def forward(self, *, features, mask):
        return self.head(self.drop(torch.tanh(self.embed(features))) * mask)


def data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return {"features": features, "extra": torch.randn(n, 2, generator=g, dtype=torch.float64),
            "mask": (torch.rand(n, 1, generator=g) > 0.2).double(),
            "y": torch.sin(features.sum(1, keepdim=True))}


def problem_for(net, forward_of, steps: int = 4) -> hd.Problem:
    def val_loss(p, h, batch, ctx):
        return ((forward_of(p, batch, ctx) - batch["y"]) ** 2).mean()

    def train_loss(p, h, batch, ctx):
        return val_loss(p, h, batch, ctx) + h["wd"] * sum((v**2).sum() for v in p.values())

    return hd.make_problem(
        train_loss, val_loss, hd.HyperParameters(lr=hd.scalar(0.2), wd=hd.scalar(1e-2)),
        net.params, optimizer=hd.sgd("lr", 0.9), steps=steps,
        train_data=[data(16, 1), data(16, 2)], val_data=data(16, 3),
    )


def test_several_positional_inputs():
    torch.manual_seed(0)
    module = TwoInputs().double()
    net = hd.functional(module)
    batch = data(5, 0)
    ctx = StepContext(step=0, seed=0, train=True)
    expected = module(batch["features"], batch["extra"])
    assert torch.equal(net(net.params, batch["features"], batch["extra"], ctx=ctx), expected)
    assert torch.equal(net(net.params, batch["features"], batch["extra"], ctx), expected)
    problem = problem_for(net, lambda p, b, c: net(p, b["features"], b["extra"], c))
    reverse = hd.reverse()(problem)
    assert rel(hd.finite_difference(warn=False)(problem), reverse) <= 1e-6


def test_keyword_inputs_from_a_dict_with_dropout():
    torch.manual_seed(0)
    module = KeywordInputs().double()
    net = hd.functional(module)
    batch = data(5, 0)
    with torch.no_grad():
        module.eval()
        expected = module(features=batch["features"], mask=batch["mask"])
    inputs = {"features": batch["features"], "mask": batch["mask"]}
    assert torch.equal(net(net.params, **inputs), expected)  # eval: no dropout
    problem = problem_for(
        net, lambda p, b, c: net(p, features=b["features"], mask=b["mask"], ctx=c))
    reverse = hd.reverse()(problem)
    # the dropout masks are replayed exactly by every method
    assert rel(hd.checkpointed(2)(problem), reverse) <= 1e-10
    assert rel(hd.forward()(problem), reverse) <= 1e-10
    assert rel(hd.finite_difference(warn=False)(problem), reverse) <= 1e-6


def test_dict_passed_positionally_gets_a_hint():
    net = hd.functional(KeywordInputs().double())
    batch = {"features": torch.zeros(2, 3, dtype=torch.float64),
             "mask": torch.ones(2, 1, dtype=torch.float64)}
    with pytest.raises(hd.HyperdiffError, match=r"net\(params, \*\*batch, ctx=ctx\)"):
        net(net.params, batch)


def test_one_dict_argument_in_training_mode():
    """``module(batch)`` with a dict, dropout on: this crashed with "'dict' object has no
    attribute 'is_cuda'" when the RNG device was read from the single input."""

    class DictModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = KeywordInputs()

        def forward(self, batch):
            return self.inner(features=batch["features"], mask=batch["mask"])

    torch.manual_seed(0)
    net = hd.functional(DictModule().double())
    batch = data(6, 0)
    ctx = StepContext(step=3, seed=5, train=True)
    first = net(net.params, batch, ctx)
    again = net(net.params, batch, StepContext(step=3, seed=5, train=True))
    assert torch.equal(first, again)  # the same dropout mask for the same (seed, step)
    other = net(net.params, batch, StepContext(step=4, seed=5, train=True))
    assert not torch.equal(first, other)


def test_ctx_given_twice_is_refused():
    net = hd.functional(nn.Linear(2, 1))
    ctx = StepContext(step=0, seed=0, train=False)
    with pytest.raises(hd.HyperdiffError, match="ctx must be given once"):
        net(net.params, torch.zeros(1, 2), ctx, ctx=ctx)


def test_module_tensors_not_in_params_follow_the_params():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    module.register_buffer("unused_constant", torch.ones(2, dtype=torch.float64))
    net = hd.functional(module)
    trained = {k: v.float() for k, v in net.params.items() if not k.startswith("0.")}
    x = torch.randn(5, 3)
    out = net(trained, x)  # the frozen first layer (float64) comes in as float32
    assert out.dtype == torch.float32
    expected = nn.Sequential(*module).float()(x)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_torch_compile_module_differentiates_its_eager_module():
    calls = []

    def counting_backend(graph_module, example_inputs):  # no compiler: only counts calls
        calls.append(len(example_inputs))
        return graph_module.forward

    torch.manual_seed(0)
    module = TwoInputs().double()
    net = hd.functional(torch.compile(module, backend=counting_backend))
    plain = hd.functional(module)
    assert list(net.params) == list(plain.params)  # no "_orig_mod." prefix
    forward_of = lambda n: lambda p, b, c: n(p, b["features"], b["extra"], c)  # noqa: E731
    compiled_hg = hd.reverse()(problem_for(net, forward_of(net)))
    plain_hg = hd.reverse()(problem_for(plain, forward_of(plain)))
    assert torch.equal(compiled_hg.vector, plain_hg.vector)
    assert calls == []  # training and its double backward never touched the compiled module
    batch = data(5, 0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = net(compiled_hg.params, batch["features"], batch["extra"])
    assert calls, "graph-free evaluation runs the compiled module"
    expected = torch.func.functional_call(module, compiled_hg.params,
                                          (batch["features"], batch["extra"]))
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_torch_compile_submodule_is_refused():
    module = TwoInputs()
    module.a = torch.compile(module.a, backend="eager")  # type: ignore[assignment]
    with pytest.raises(hd.HyperdiffError, match="double backward"):
        hd.functional(module)


def test_rng_devices_are_found_in_every_argument():
    from hyperdiff.engine.models import _tensor_devices

    cpu = torch.zeros(1)
    assert _tensor_devices({"w": cpu}, ({"ids": cpu, "x": [cpu]},), {"mask": cpu}) == []
    if torch.cuda.is_available():
        gpu = torch.zeros(1, device="cuda")
        assert _tensor_devices({"w": cpu}, ({"ids": [gpu]},), {}) == [gpu.device]
