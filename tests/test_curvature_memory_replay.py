"""Two s41 fixes. ``curvature`` with a per-tensor learning rate (and a per-tensor or per-element
weight decay) kept ``d lr_t / du`` as a ``(K, P, n)`` tensor (every raw value, every parameter
entry, every step of the window: T of them offline), memory O(T P n) where the method's is the
tangent's ``R n``; the derivatives are now kept per parameter tensor in the tangent's rows and
repeated over the entries one step at a time, with the same numbers bit for bit (checked here
against the old expansion written out). ``checkpointed`` accepted a replay off by up to
``sqrt(eps) * max(1, max |s|)`` (a training that is not a function of (step, seed) passed
silently); it now raises beyond a few ulps per element."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

import hyperdiff as hd
from hyperdiff.diagnose.check import peak_memory
from hyperdiff.engine.optimizers import resolve
from hyperdiff.methods.curvature import lr_derivatives
from hyperdiff.methods.curvature_rule import carried_rows, carries_decay

from conftest import sine_data

# the modules (``hyperdiff.methods.curvature`` and ``.checkpointed`` are also the functions)
curvature_module = sys.modules["hyperdiff.methods.curvature"]
checkpointed_module = sys.modules["hyperdiff.methods.checkpointed"]


def params(dtype, width=4):
    g = torch.Generator().manual_seed(0)
    return {"W1": (torch.randn(5, width, generator=g) * 0.5).to(dtype),
            "b1": torch.zeros(width, dtype=dtype),
            "W2": (torch.randn(width, 1, generator=g) * 0.5).to(dtype)}


def loss(p, h, batch):
    x, y = batch
    pred = torch.tanh(x.to(p["W1"].dtype) @ p["W1"] + p["b1"]) @ p["W2"]
    return ((pred - y.to(pred.dtype)) ** 2).mean()


def make(lr_kind, wd_kind, optimizer="sgd", dtype=torch.float64, steps=12, width=4):
    theta = params(dtype, width)
    hp = {"lr": hd.per_tensor(theta, 0.05) if lr_kind == "per_tensor" else hd.scalar(0.05),
          "wd": {"per_tensor": hd.per_tensor, "per_element": hd.per_element}[wd_kind](theta, 1e-3)}
    opt = {"sgd": hd.sgd("lr", 0.9, weight_decay="wd"), "adam": hd.adam("lr", weight_decay="wd"),
           "adamw": hd.adamw("lr", weight_decay="wd")}[optimizer]
    x, y = sine_data(24, 5, seed=1)
    return hd.make_problem(loss, loss, hd.HyperParameters(**hp), theta, optimizer=opt,
                           train_data=hd.minibatches(x, y, batch_size=6),
                           val_data=sine_data(16, 5, seed=2), steps=steps, seed=0, probe=False)


def expanded_derivatives(prob, raw, start, stop, name):
    """The derivatives as before the fix: one batched backward pass from the flat vector of all
    raw values over the window's (K, tensors) values, repeated over every parameter entry:
    ``(K, n)`` and ``(K, P, n)``."""
    hp = prob.hparams
    coef = prob.optimizer.coefficients[name]
    flat = hp.flatten(prob.raw_tensors(raw)).detach().requires_grad_()
    hview = hp.view(hp.unflatten(flat))
    rows = torch.stack([torch.stack([torch.as_tensor(resolve(coef, hview, t, k)).reshape(())
                                     for k in prob.params]) for t in range(start, stop)])
    eye = torch.eye(rows.numel(), dtype=rows.dtype)
    (jac,) = torch.autograd.grad(rows.reshape(-1), flat, eye, is_grads_batched=True)
    jac = jac.reshape(*rows.shape, -1)
    counts = torch.tensor([p.numel() for p in prob.params.values()])
    return (torch.repeat_interleave(rows.detach(), counts, dim=1),
            torch.repeat_interleave(jac, counts, dim=1).transpose(1, 2))


class OldCoefficients:
    """``_window_coefficients`` as before the fix (the (K, R, n) tensors), for the comparison."""

    def __init__(self, prob, raw, start, stop):
        rows = carried_rows(prob)
        lrs, dlrs = expanded_derivatives(prob, raw, start, stop, "lr")
        dwds = (expanded_derivatives(prob, raw, start, stop, "weight_decay")[1]
                if carries_decay(prob) else None)
        if rows is not None:
            dlrs = dlrs[:, rows]
            dwds = None if dwds is None else dwds[:, rows]
        self.value = curvature_module._Coefficients(lrs, dlrs, dwds, rows)


@pytest.mark.parametrize("wd_kind", ["per_tensor", "per_element"])
def test_per_tensor_derivatives_are_kept_per_tensor_in_the_tangent_s_rows(wd_kind):
    prob = make("per_tensor", wd_kind)
    raw = {n: v * 1.1 for n, v in prob.hparams.raw.items()}
    lrs, dlrs = lr_derivatives(prob, raw, 2, 9, carried=True)
    rows = carried_rows(prob)  # the learning rate's 3 (and the per-tensor decay's 3: all)
    tensors = len(prob.params)
    count = prob.hparams.numel if rows is None else len(rows)
    assert lrs.shape == (7, tensors) and dlrs.shape == (7, count, tensors) and count in (3, 6)
    old_lrs, old_dlrs = expanded_derivatives(prob, raw, 2, 9, "lr")
    sizes = [p.numel() for p in prob.params.values()]
    window_lrs = curvature_module.WindowValues(lrs, sizes)
    window_dlrs = curvature_module.WindowValues(dlrs, sizes)
    for i in range(7):  # one step at a time: the same bits as the old (K, P, n) tensor's rows
        assert torch.equal(window_lrs[i], old_lrs[i])
        assert torch.equal(window_dlrs[i], old_dlrs[i] if rows is None else old_dlrs[i][rows])


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_hypergradients_equal_the_old_expanded_derivatives_bit_for_bit(
        optimizer, dtype, monkeypatch):
    """Offline and two online windows; per-tensor learning rate and weight decay (SGD's and
    AdamW's carried). A control: the old code gives these bits too."""
    prob = make("per_tensor", "per_tensor", optimizer, dtype)
    method = hd.methods.curvature()
    raw = prob.raw_tensors(None)
    state = hd.engine.training.initial_state(prob, prob.hparams.view(raw), differentiable=False)

    def run():
        offline = method(prob).grad
        first = method.segment(prob, state, raw, 0, 5, list(prob.val_data))
        second = method.segment(prob, first.state, raw, 5, 12, list(prob.val_data), first.carry)
        return [offline, first.grad, second.grad]

    ours = run()
    monkeypatch.setattr(curvature_module, "_window_coefficients",
                        lambda *args: OldCoefficients(*args).value)
    theirs = run()
    for mine, reference in zip(ours, theirs, strict=True):
        assert all(torch.equal(mine[n], reference[n]) for n in reference)


def test_chunked_derivatives_give_the_same_bits(monkeypatch):
    """An offline window is differentiated a few steps at a time (``JACOBIAN_ROWS``)."""
    prob = make("per_tensor", "per_tensor", steps=10)
    whole = lr_derivatives(prob, prob.hparams.raw, 0, 10, carried=True)
    monkeypatch.setattr(curvature_module, "JACOBIAN_ROWS", 4)  # one step (3 tensors) a pass
    chunked = lr_derivatives(prob, prob.hparams.raw, 0, 10, carried=True)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))


def test_offline_memory_does_not_grow_with_the_steps_times_the_raw_values():
    """Per-tensor learning rate, per-element weight decay (P = n + 3 raw values): the old
    derivatives alone were T P n numbers (32 * 227 * 224 * 4 bytes = 6.5 MB)."""
    peaks = {}
    for steps in (8, 32):
        prob = make("per_tensor", "per_element", dtype=torch.float32, steps=steps, width=32)
        method = hd.methods.curvature()
        method(prob)
        peaks[steps] = peak_memory(lambda m=method, p=prob: m(p))[1]
    n = sum(p.numel() for p in prob.params.values())
    assert n == 224 and prob.hparams.numel == n + 3
    assert peaks[32] < 200_000, peaks  # tangents, the step's gradients and graph: ~60 kB
    assert peaks[32] < 2 * peaks[8] + 20_000, peaks


def test_a_replay_off_by_far_less_than_sqrt_eps_is_refused():
    """A relative perturbation of 1e-9 in float64: far below the old tolerance (1.5e-8 times
    the largest stored value), far above rounding."""
    prob = make("scalar", "per_tensor", steps=12)
    calls = [0]

    def train_loss(p, h, batch):
        calls[0] += 1  # a loss that keeps state: not a function of (step, seed)
        x, y = batch
        return loss(p, h, (x * (1 + 1e-9 * (calls[0] % 3)), y))

    prob = dataclasses.replace(prob, train_loss=train_loss)
    with pytest.raises(hd.HyperdiffError) as error:
        hd.checkpointed(3)(prob)
    message = str(error.value)
    for part in ("checkpointed: replaying steps", "(seed 0) must reproduce the stored state",
                 "4 ulps per element", "not a function of (step, seed)",
                 "keep no state between calls", "ctx.next_seed()", "entries off"):
        assert part in message, message


def test_a_deterministic_replay_is_exact_and_accepted():
    prob = make("scalar", "per_tensor", steps=12)
    result = hd.checkpointed(3)(prob)
    assert result.diagnostics["replay_mismatch"] == 0.0
    reference = hd.reverse()(prob)
    assert all(torch.allclose(result.grad[n], reference.grad[n], rtol=1e-12, atol=0)
               for n in reference.grad)


def test_the_replay_check_is_per_element_not_scaled_by_the_largest_value():
    prob = make("scalar", "per_tensor", dtype=torch.float32)
    eps = torch.finfo(torch.float32).eps
    stored = [torch.tensor([1000.0, 0.01, -0.5]), torch.tensor([7])]
    check = checkpointed_module._check_replay

    def off(ulps):
        return [stored[0] * torch.tensor([1.0, 1.0 + ulps * eps, 1.0]), stored[1].clone()]

    assert check(prob, [t.clone() for t in stored], stored, 0, 4) == 0.0
    assert check(prob, off(2), stored, 0, 4) > 0.0  # a GPU's summation order: accepted
    with pytest.raises(hd.HyperdiffError, match=r"got 1 of 4 entries off"):
        check(prob, off(50), stored, 0, 4)  # 5e-7 of 0.01; the old tolerance was 0.35
    with pytest.raises(hd.HyperdiffError, match=r"replaying steps 0\.\.3"):
        check(prob, [stored[0].clone(), torch.tensor([8])], stored, 0, 4)  # a count
