"""Long-horizon reverse modes against full reverse mode and hand-written oracles.

- checkpointed == reverse to float64 rounding (several segment counts; SGD momentum, Adam,
  BatchNorm + dropout on minibatches), with a bit-exact replay;
- truncated(K >= T) == reverse exactly; truncated(K < T) == a hand-written truncated unroll
  and differs from reverse (it is biased);
- reversible == reverse to <= 1e-6 relative in float64 over T = 1000, its exact arithmetic
  against Python integers, float32 closeness;
- bad input gives clear errors.
"""

import itertools
import math
import random
from functools import cache

import pytest
import torch
from torch import nn

import hyperdiff as hd
from hyperdiff.methods.checkpointed import checkpointed, segment_bounds
from hyperdiff.methods.reverse import reverse
from hyperdiff.methods.reversible import (
    DENOMINATOR,
    InfoBuffer,
    reversible,
    scale_down,
    scale_up,
)
from hyperdiff.methods.truncated import truncated

from conftest import decayed_mse_losses, rel_err, sine_data

STEPS = 12



_data = sine_data


def _mlp_problem(case: str) -> hd.Problem:
    torch.manual_seed(1)
    layers: list[nn.Module] = [nn.Linear(5, 6)]
    if case == "batchnorm_dropout":
        layers += [nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2)]
    else:
        layers += [nn.Tanh()]
    net = hd.functional(nn.Sequential(*layers, nn.Linear(6, 1)).double())

    train_loss, val_loss = decayed_mse_losses(net)
    hp = {"wd": hd.per_tensor(net.params, 1e-2)}
    if case == "adam":
        hp |= {"lr": hd.scalar(0.05), "b1": hd.scalar(0.8, (0.0, 1.0))}
        optimizer = hd.adam("lr", betas=("b1", 0.99))
    else:
        hp |= {"lr": hd.per_step(STEPS, 0.15), "mom": hd.scalar(0.8, (0.0, 1.0))}
        optimizer = hd.sgd("lr", "mom")
    x, y = _data()
    return hd.make_problem(
        train_loss, val_loss, hd.HyperParameters(**hp), net.params, buffers=net.buffers,
        optimizer=optimizer, train_data=hd.minibatches(x, y, batch_size=8),
        val_data=_data(16, seed=1), steps=STEPS, seed=3,
    )


@cache
def _problem_and_reference(case: str):
    problem = _mlp_problem(case)
    return problem, reverse()(problem)


CASES = ["sgd_momentum", "adam", "batchnorm_dropout"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("segments", [1, 2, 5, None, STEPS, 50])
def test_checkpointed_equals_reverse(case, segments):
    problem, ref = _problem_and_reference(case)
    got = checkpointed(segments)(problem)
    assert rel_err(got.vector, ref.vector) < 1e-12
    assert got.value == ref.value
    assert got.diagnostics["replay_mismatch"] == 0.0
    assert got.diagnostics["segments"] == min(segments or math.ceil(math.sqrt(STEPS)), STEPS)
    for k in ref.params:
        assert torch.equal(got.params[k], ref.params[k])
    for k in ref.buffers:
        assert torch.equal(got.buffers[k], ref.buffers[k])


def test_segment_bounds_cover_the_run():
    for steps in (1, 7, 100, 1000):
        for segments in (1, 3, 31, 2000):
            b = segment_bounds(steps, segments)
            assert b[0] == 0 and b[-1] == steps and len(b) == min(segments, steps) + 1
            sizes = [hi - lo for lo, hi in itertools.pairwise(b)]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("case", ["sgd_momentum", "batchnorm_dropout"])
@pytest.mark.parametrize("k", [STEPS, STEPS + 5])
def test_truncated_with_k_at_least_t_is_reverse(case, k):
    problem, ref = _problem_and_reference(case)
    got = truncated(k)(problem)
    assert torch.equal(got.vector, ref.vector)
    assert got.value == ref.value
    assert got.diagnostics["differentiated_steps"] == STEPS


def _truncated_oracle(batches, val, raw, params, k, steps):
    """Heavy-ball SGD written out by hand; the graph starts at step ``steps - k``."""
    raw = {n: v.detach().clone().requires_grad_() for n, v in raw.items()}
    lr, mu, wd = raw["lr"].exp(), torch.sigmoid(raw["mom"]), raw["wd"].exp()
    p = {n: v.clone() for n, v in params.items()}
    buf = {n: torch.zeros_like(v) for n, v in params.items()}
    for t in range(steps):
        if t == steps - k:
            p = {n: v.detach().requires_grad_() for n, v in p.items()}
            buf = {n: v.detach() for n, v in buf.items()}
        live = t >= steps - k
        h = (lr, mu, wd) if live else (lr.detach(), mu.detach(), wd.detach())
        q = p if live else {n: v.detach().requires_grad_() for n, v in p.items()}
        loss = _logistic_train(q, h[2], batches[t % len(batches)])
        grads = torch.autograd.grad(loss, list(q.values()), create_graph=live)
        for (n, v), g in zip(q.items(), grads, strict=True):
            buf[n] = g if t == 0 else h[1] * buf[n] + g
            p[n] = v - h[0] * buf[n] if live else (v - h[0] * buf[n]).detach()
    value = _logistic_val(p, val)
    return torch.stack(torch.autograd.grad(value, [raw["lr"], raw["mom"], raw["wd"]]))


def _logistic_train(p, wd, batch):
    x, y = batch
    return nn.functional.cross_entropy(x @ p["W"] + p["b"], y) + wd * (p["W"] ** 2).sum()


def _logistic_val(p, batch):
    x, y = batch
    return nn.functional.cross_entropy(x @ p["W"] + p["b"], y)


def _logistic_problem(steps, dtype=torch.float64, optimizer=None, hparams=None, batches=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(48, 3, generator=g, dtype=torch.float64)).argmax(1)
    params = {"W": 0.1 * torch.randn(6, 3, generator=g, dtype=torch.float64).to(dtype),
              "b": torch.zeros(3, dtype=dtype)}
    x = x.to(dtype)
    hp = hparams or hd.HyperParameters(
        lr=hd.scalar(0.2), mom=hd.scalar(0.9, (0.0, 1.0)), wd=hd.scalar(1e-2)
    )
    per = 48 // batches
    train = [(x[i * per : (i + 1) * per], y[i * per : (i + 1) * per]) for i in range(batches)]
    return hd.make_problem(
        lambda p, h, b: _logistic_train(p, h["wd"], b), lambda p, h, b: _logistic_val(p, b),
        hp, params, optimizer=optimizer or hd.sgd("lr", "mom"), train_data=train,
        val_data=(x[:16], y[:16]), steps=steps, probe=False,
    ), train, (x[:16], y[:16])


@pytest.mark.parametrize("k", [1, 5, 20])
def test_truncated_is_the_biased_truncated_derivative(k):
    steps = 30
    problem, batches, val = _logistic_problem(steps)
    raw = problem.raw_tensors()
    full = _truncated_oracle(batches, val, raw, problem.params, steps, steps)
    assert rel_err(reverse()(problem).vector, full) < 1e-12  # the oracle is right at K = T
    oracle = _truncated_oracle(batches, val, raw, problem.params, k, steps)
    got = truncated(k)(problem)
    assert rel_err(got.vector, oracle) < 1e-12
    assert rel_err(got.vector, full) > 1e-3  # biased: it is not the full hypergradient
    assert got.diagnostics["differentiated_steps"] == k


def test_reversible_equals_reverse_float64_t1000():
    problem, _, _ = _logistic_problem(1000)
    ref = reverse()(problem)
    got = reversible()(problem)
    assert rel_err(got.vector, ref.vector) < 1e-6
    assert abs(got.value - ref.value) < 1e-9
    # the stored information is ~ log2(1/mu) bits per element and step, not T floats
    bits = got.diagnostics["info_bits_per_element"]
    assert 1000 * math.log2(1 / 0.9) <= bits <= 1000 * math.log2(1 / 0.9) + 64


def test_reversible_coefficient_forms_and_float32():
    # per-tensor lr, a momentum schedule, constant weight decay and dampening
    params = {"W": torch.zeros(6, 3), "b": torch.zeros(3)}
    hp = hd.HyperParameters(
        lr=hd.per_tensor(params, {"W": 0.3, "b": 0.1}),
        mom=hd.per_step(60, [0.5 + 0.4 * t / 60 for t in range(60)], (0.0, 1.0)),
        wd=hd.scalar(1e-2),
    )
    opt = hd.sgd("lr", "mom", weight_decay=1e-3, dampening=0.1)
    problem, _, _ = _logistic_problem(60, optimizer=opt, hparams=hp)
    assert rel_err(reversible()(problem).vector, reverse()(problem).vector) < 1e-8
    # float32 (same data, rounded): both round at ~1e-7 per step; measured 6e-8 (reversible)
    # and 2e-7 (reverse) from the float64 hypergradient
    problem32, _, _ = _logistic_problem(300, dtype=torch.float32)
    ref64 = reverse()(_logistic_problem(300)[0]).vector.float()
    assert rel_err(reversible()(problem32).vector, ref64) < 1e-5
    assert rel_err(reverse()(problem32).vector, ref64) < 1e-5


def test_reversible_replays_dropout_exactly():
    torch.manual_seed(2)
    net = hd.functional(
        nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 1)).double()
    )

    def loss(p, h, batch, ctx):
        return ((net(p, batch[0], ctx) - batch[1]) ** 2).mean()

    x, y = _data()
    hp = hd.HyperParameters(lr=hd.scalar(0.1), mom=hd.scalar(0.8, (0.0, 1.0)))
    problem = hd.make_problem(
        loss, loss, hp, net.params, optimizer=hd.sgd("lr", "mom"),
        train_data=hd.minibatches(x, y, batch_size=8), val_data=_data(16, seed=1), steps=40,
        seed=5,
    )
    assert rel_err(reversible()(problem).vector, reverse()(problem).vector) < 1e-8


def test_exact_arithmetic_against_python_integers():
    rng = random.Random(0)
    numel = 5
    info, stacks = InfoBuffer(numel), [0] * numel
    x = torch.tensor([rng.randrange(-(2**61), 2**61) for _ in range(numel)])
    start = x.clone()
    history = []
    for _ in range(200):
        n = torch.tensor([rng.randrange(1, DENOMINATOR + 1) for _ in range(numel)])
        new = scale_down(x, n, info)
        for i in range(numel):  # |x' - x n / D| < 1
            assert abs(int(new[i]) * DENOMINATOR - int(x[i]) * int(n[i])) < DENOMINATOR * 2
        history.append(n)
        x = new
    # the buffer holds as many bits as the products destroyed (plus at most one limb)
    lost = max(sum(math.log2(DENOMINATOR / int(n[i])) for n in history) for i in range(numel))
    assert len(info.limbs) * 31 <= lost + 62
    for n in reversed(history):
        x = scale_up(x, n, info)
    assert torch.equal(x, start) and not info.limbs
    # push/pop of arbitrary bases is big-integer arithmetic
    digits = []
    for _ in range(100):
        base = rng.choice([DENOMINATOR, rng.randrange(2, DENOMINATOR)])
        d = torch.tensor([rng.randrange(base) for _ in range(numel)])
        info.push(d, base if base == DENOMINATOR else torch.full((numel,), base))
        stacks = [s * base + int(v) for s, v in zip(stacks, d, strict=True)]
        digits.append((base, d))
    value = [sum(int(limb[i]) << (31 * j) for j, limb in enumerate(info.limbs))
             for i in range(numel)]
    assert value == stacks
    for base, d in reversed(digits):
        assert torch.equal(info.pop(base), d)
    assert not info.limbs


def test_bad_input_errors():
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(hd.HyperdiffError, match="truncated: k must be a positive int"):
            truncated(bad)
    for bad in (0, -3, 2.0, False):
        with pytest.raises(hd.HyperdiffError, match="checkpointed: segments must be"):
            checkpointed(bad)
    for bad in (4, 60, 44.0):
        with pytest.raises(hd.HyperdiffError, match="reversible: fraction_bits must be"):
            reversible(bad)
    adam, _, _ = _logistic_problem(5, optimizer=hd.adam("lr"))
    with pytest.raises(hd.HyperdiffError, match="reversible: the optimizer must be hd.sgd"):
        reversible()(adam)
    plain, _, _ = _logistic_problem(5, optimizer=hd.sgd("lr"))
    with pytest.raises(hd.HyperdiffError, match="momentum must be non-zero"):
        reversible()(plain)
    nesterov, _, _ = _logistic_problem(5, optimizer=hd.sgd("lr", "mom", nesterov=True))
    with pytest.raises(hd.HyperdiffError, match="heavy-ball momentum"):
        reversible()(nesterov)
    # also where the learning rate at step 1 is 0, where an update probe cannot tell Nesterov
    # from heavy ball (until s39 it ran heavy ball, 15% off in dL/dmom)
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randn(24, 1, dtype=torch.float64)
    mse = lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()  # noqa: E731
    rates = [0.1, 0.0] + [0.1] * 6
    paused = hd.make_problem(mse, mse, hd.HyperParameters(lr=hd.per_step(8, rates, "free"),
                                                          mom=hd.scalar(0.5, (0.0, 1.0))),
                             {"w": torch.zeros(4, 1, dtype=torch.float64)},
                             optimizer=hd.sgd("lr", "mom", nesterov=True), train_data=(x, y),
                             val_data=(x, y), steps=8)
    with pytest.raises(hd.HyperdiffError, match="heavy-ball momentum"):
        reversible()(paused)
    problem, _ = _problem_and_reference("batchnorm_dropout")
    with pytest.raises(hd.HyperdiffError, match="must have no buffers"):
        reversible()(problem)


def test_reversible_detects_overflow_and_nondeterminism():
    problem, _, _ = _logistic_problem(50)
    huge = problem.raw_tensors() | {"lr": torch.tensor(math.log(1e4), dtype=torch.float64)}
    with pytest.raises(hd.NonFiniteError, match="fixed-point range"):
        reversible(fraction_bits=56)(problem, huge)
    x, y = _data()

    calls = itertools.count()

    def noisy(p, h, b):  # state outside (step, seed), which the replay does not reproduce
        return ((b[0] @ p["w"] - b[1]) ** 2).mean() + 1e-3 * math.sin(next(calls)) * p["w"].sum()

    hp = hd.HyperParameters(lr=hd.scalar(0.1), mom=hd.scalar(0.9, (0.0, 1.0)))
    problem = hd.make_problem(
        noisy, noisy, hp, {"w": torch.zeros(5, 1, dtype=torch.float64)},
        optimizer=hd.sgd("lr", "mom"), train_data=(x, y), val_data=(x, y), steps=20,
    )
    with pytest.raises(hd.NonFiniteError, match="retrace the forward pass exactly"):
        reversible()(problem)


def test_schedule_initial_values_are_checked_under_their_own_names():
    s = hd.schedule("warmup_cosine", 10)
    # a string raised float()'s ValueError; an out-of-range warmup was blamed on "scalar: value"
    with pytest.raises(hd.HyperdiffError, match=r"^warmup_cosine: peak must be a finite number > 0"):
        s.hyperparameters(peak="big")
    with pytest.raises(hd.HyperdiffError, match=r"^warmup_cosine: warmup must be a finite number "
                                                r"in \(0, 1\) \(got 1.5\)"):
        s.hyperparameters(warmup=1.5)
    assert float(s.hyperparameters(peak=2)["lr_peak"].init) == 2.0
