"""Exact savings in the online window (issue 20 item 3, s29): a scalar learning rate's
derivatives from one backward pass instead of a batched one over the window's equal rows, and
the untrained model's losses evaluated only where the rescue or the guard reads them. Checked
against float64 central finite differences, against the batched pass they replace (bit for
bit) and by counting the untrained model's evaluations; the histories of whole runs are
compared with the code before in ``benchmarks/online_bitwise.py``."""

from __future__ import annotations

import pytest
import torch
from test_online import problem, recipe

import hyperdiff as hd
from hyperdiff.methods.curvature import lr_derivatives
from hyperdiff.tuner import guard
from hyperdiff.tuner.guard import UntrainedLosses, untrained_losses

from conftest import sine_data

pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

DT = torch.float64


def batched_rows(prob, raw, start, stop):
    """The window's ``K`` equal rows ``lr_t`` and their derivatives by one batched backward
    pass over the rows (the general path, as before this change): ``(K, 1)``, ``(K, P, 1)``."""
    hp = prob.hparams
    flat = hp.flatten(raw).detach().requires_grad_()
    lr = hp.view(hp.unflatten(flat))["lr"]
    rows = torch.stack([lr.reshape(()) for _ in range(start, stop)])
    eye = torch.eye(rows.numel(), dtype=rows.dtype)
    (jac,) = torch.autograd.grad(rows, flat, eye, is_grads_batched=True)
    return rows.detach()[:, None], jac[:, :, None]


@pytest.mark.parametrize("constraint", ["positive", "log", (1e-3, 2.0)])
def test_a_scalar_learning_rate_s_derivatives_match_finite_differences(constraint):
    hp = hd.HyperParameters(lr=hd.scalar(0.3, constraint),
                            momentum=hd.scalar(0.6, (0.0, 1.0)), wd=hd.scalar(1e-2))
    prob = problem(hp, hd.sgd("lr", "momentum"), 12)
    raw = {n: v + 0.1 for n, v in hp.raw.items()}
    lrs, dlrs = lr_derivatives(prob, raw, 3, 8)
    assert lrs.shape == (5, 1) and dlrs.shape == (5, 3, 1)
    natural = float(hp.natural(raw)["lr"])
    assert torch.equal(lrs, torch.full((5, 1), natural, dtype=DT))
    eps = 1e-6
    up, down = dict(raw), dict(raw)
    up["lr"], down["lr"] = raw["lr"] + eps, raw["lr"] - eps
    fd = float(hp.natural(up)["lr"] - hp.natural(down)["lr"]) / (2 * eps)
    index = list(hp).index("lr")
    for row in dlrs:
        assert abs(float(row[index, 0]) - fd) <= 1e-8 * max(1.0, abs(fd))
        others = [i for i in range(3) if i != index]
        assert float(row[others, 0].abs().max()) == 0.0  # momentum, wd: not the lr's


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_scalar_learning_rate_s_rows_equal_the_batched_pass_bit_for_bit(dtype):
    hp = hd.HyperParameters(lr=hd.scalar(0.3), momentum=hd.scalar(0.6, (0.0, 1.0)))
    x, y = sine_data(24, 5, seed=1)
    params = {"w": torch.randn(5, 1, dtype=dtype, generator=torch.Generator().manual_seed(0))}
    prob = hd.make_problem(lambda p, h, b: ((b[0].to(dtype) @ p["w"]) ** 2).mean(),
                           lambda p, h, b: ((b[0].to(dtype) @ p["w"]) ** 2).mean(), hp, params,
                           optimizer=hd.sgd("lr", "momentum"),
                           train_data=hd.minibatches(x, y, batch_size=6), val_data=(x, y),
                           steps=20, seed=0, probe=False)
    raw = {n: (v * 1.37 - 0.2).to(dtype) for n, v in hp.raw.items()}
    ours = lr_derivatives(prob, raw, 7, 19)
    reference = batched_rows(prob, raw, 7, 19)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        assert torch.equal(mine, theirs)


def test_untrained_losses_are_evaluated_once_each_where_read(monkeypatch):
    prob = recipe(6)
    xs, ys = sine_data(10, 5, seed=3)
    selection = [(xs, ys)]
    calls = []
    counted = guard.untrained_loss

    def counting(*args, **kwargs):
        calls.append(args[-1])
        return counted(*args, **kwargs)

    monkeypatch.setattr(guard, "untrained_loss", counting)
    eager = untrained_losses([prob], prob.hparams.raw, None, selection)
    assert len(calls) == 2
    lazy = UntrainedLosses([prob], prob.hparams.raw, None, selection)
    assert len(calls) == 2  # nothing evaluated before a read
    assert lazy["validation"] == eager["validation"]
    assert lazy.get("validation") == eager["validation"] and len(calls) == 3
    assert lazy.get("selection") == eager["selection"] and len(calls) == 4
    assert calls[-1] is selection
    assert lazy.get("train") is None and dict(lazy) == eager and len(calls) == 4
    assert dict(UntrainedLosses([prob], prob.hparams.raw, None, None)) == {
        "validation": eager["validation"]}


def test_an_online_run_evaluates_the_untrained_selection_loss_only_when_checked(monkeypatch):
    """Before, the first window evaluated the untrained model on the validation and the
    selection batches, and the last window (its first selection loss) both again: 4 passes.
    Now the validation pass at the first window and the selection pass at the last: 2, with
    the same history."""
    xs, ys = sine_data(10, 5, seed=3)

    def run():
        tuner = hd.online.OnlineTuner(recipe(12), window=4, method="curvature", lr=0.05,
                                      selection=(xs, ys))
        return [r.without_timing() for r in tuner.run().history]

    plain = run()
    read = []
    counted = guard.untrained_loss

    def counting(*args, **kwargs):
        read.append("selection" if args[-1] is not None and len(args[-1][0][0]) == 10
                    else "validation")
        return counted(*args, **kwargs)

    monkeypatch.setattr(guard, "untrained_loss", counting)
    assert run() == plain
    assert read == ["validation", "selection"]
    assert plain[-1]["selection_loss"] is not None
