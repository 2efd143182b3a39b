"""Issue 19 item 3: samples and their signal-to-noise ratio in the online plan.

Online, sample ``j`` of window ``h`` is the window hypergradient of the one window trajectory
evaluated at its own validation batch (``val_batch_size`` rows drawn from ``(seed, h, j)``), and
with a REINFORCE choice at its own draw ``z_j`` (a training of the window from the same start).
References: each sample computed on its own in the test through the single-sample segment from
the window's start state (and, for reverse, a hand-written unroll of the window), the expected
validation loss over every validation batch the plan can draw (all ``C(6, 2)`` row pairs),
the SNR written out from the per-sample values, an uninterrupted run (resume), and one process
against 2 gloo ranks (data parallel).
"""

from __future__ import annotations

import copy
import itertools
import math
import multiprocessing as mp
import pickle
from typing import Any

import distributed_jobs
import pytest
import torch
from distributed_jobs import WORLD, close, launch

import hyperdiff as hd
from hyperdiff import seeds
from hyperdiff.tuner.driver import HyperOptimizer

DT = torch.float64
GEN = torch.Generator().manual_seed(3)
X = torch.randn(16, 3, generator=GEN, dtype=DT)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) + 0.3 * torch.randn(16, generator=GEN, dtype=DT)
XV = torch.randn(6, 3, generator=GEN, dtype=DT)
YV = XV @ torch.tensor([0.8, -1.5, 0.9], dtype=DT)
BATCH, MOMENTUM = 4, 0.5


def _mse(w, x, y):
    return ((x @ w - y) ** 2).mean()


def regression(steps: int = 8, momentum: float = MOMENTUM, choice: dict | None = None
               ) -> hd.Problem:
    """Linear regression on minibatches of 4 rows by SGD with momentum; tuned: the learning rate
    and an L2 strength (and a REINFORCE choice added to the validation loss when given)."""
    specs: dict[str, Any] = {"lr": hd.scalar(0.05), "lam": hd.scalar(0.1)}
    if choice is not None:
        specs["c"] = hd.categorical((0.0, 1.0, 2.5), mode="reinforce", init=[0.2, 0.5, 0.3],
                                    **choice)

    def val_loss(p, h, b):
        extra = (hd.choose(h["c"]) - 1.3) ** 2 * p["w"].square().sum() if choice else 0.0
        return _mse(p["w"], *b) + extra

    return hd.make_problem(
        lambda p, h, b: _mse(p["w"], *b) + h["lam"] * p["w"].square().sum(),
        val_loss, hd.HyperParameters(**specs), {"w": torch.zeros(3, dtype=DT)},
        optimizer=hd.sgd(lr="lr", momentum=momentum),
        train_data=hd.minibatches(X, Y, batch_size=BATCH),
        val_data=(XV, YV), steps=steps)


METHODS = {"reverse": hd.reverse, "truncated": lambda: hd.truncated(2), "forward": hd.forward,
           "curvature": lambda: hd.methods.curvature(horizon=20), "implicit": hd.implicit}


def online(problem: hd.Problem, method: Any, samples: int, *, window: int = 3,
           val_batch_size: int | None = 2, lr: float = 0.05, **plan: Any) -> HyperOptimizer:
    return HyperOptimizer(problem, plan=hd.plans.OnlinePlan(
        window=window, val_batch_size=val_batch_size, samples=samples, hot_start="ignore",
        **plan), method=method, lr=lr, schedule="constant")


def window_by_hand(loop: HyperOptimizer) -> tuple[Any, Any, dict[str, torch.Tensor], int, int]:
    """The next window's start: state, carry, raw values (on the problem), start and stop."""
    plan = loop.plan
    start = plan.inner_step
    return (plan.state, plan.tangent, plan.problem.raw_tensors(loop.raw), start,
            min(start + plan.window, plan.problem.steps))


def separate_samples(loop: HyperOptimizer, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample of the loop's next window on its own: the single-sample segment from the
    window's start state at validation batch j. Returns the flat hypergradients ``(m, k)`` and
    the validation losses ``(m,)``."""
    plan, method = loop.plan, loop.plan.method
    state, carry, raw, start, stop = window_by_hand(loop)
    grads, values = [], []
    for j in range(samples):
        val = plan.val_batches(loop.seed, loop.step_index, j)
        out = method.segment(plan.problem, state, raw, start, stop, val, carry)
        grads.append(loop.hparams.flatten(out.grad).double())
        values.append(out.value)
    return torch.stack(grads), torch.tensor(values, dtype=DT)


# ------------------------------------------------------------------ (1) the mean of the samples
@pytest.mark.parametrize("name", list(METHODS))
def test_the_window_hypergradient_is_the_mean_of_its_samples_computed_apart(name):
    loop = online(regression(), METHODS[name](), samples=3)
    for _ in range(3):  # the second and third windows start from a carry
        grads, values = separate_samples(loop, 3)
        assert grads.std(0).norm() > 1e-6  # the samples differ
        record = loop.step()
        got = loop.hparams.flatten({n: torch.as_tensor(v, dtype=DT)
                                    for n, v in record.grad.items()})
        assert torch.allclose(got, grads.mean(0), rtol=0, atol=1e-12), (name, record.step)
        assert record.samples == 3
        assert record.val_loss == pytest.approx(float(values.mean()), rel=1e-12)


def _window_by_hand(w, b, lr, lam, steps, x_val, y_val):
    """The reverse window written out: ``steps`` (start, index) of heavy-ball SGD on the
    minibatches from ``(w, b)`` at ``lr, lam``; the validation loss at the end."""
    data = hd.minibatches(X, Y, batch_size=BATCH)
    for step in steps:
        x, y = data.batch(step, 0)  # the problem's seed
        grad = 2 * x.T @ (x @ w - y) / len(y) + 2 * lam * w
        b = grad if step == 0 else MOMENTUM * b + grad
        w = w - lr * b
    return _mse(w, x_val, y_val)


def test_the_reverse_samples_match_a_hand_written_window():
    loop = online(regression(), hd.reverse(), samples=4)
    loop.step()  # the second window, from a trained state with momentum
    state, _, raw, start, stop = window_by_hand(loop)
    by_hand = []
    for j in range(4):
        x_val, y_val = loop.plan.val_batches(loop.seed, loop.step_index, j)[0]
        u = {n: v.detach().clone().requires_grad_() for n, v in raw.items()}
        natural = loop.hparams.natural(u)
        loss = _window_by_hand(state.params["w"], state.opt_state.momentum["w"],
                               natural["lr"], natural["lam"], range(start, stop), x_val, y_val)
        by_hand.append(torch.stack([g.reshape(()) for g in torch.autograd.grad(
            loss, [u["lr"], u["lam"]])]))
    record = loop.step()
    expected = torch.stack(by_hand).mean(0)
    assert record.grad["lr"] == pytest.approx(float(expected[0]), rel=1e-10, abs=1e-14)
    assert record.grad["lam"] == pytest.approx(float(expected[1]), rel=1e-10, abs=1e-14)


# ------------------------------------------------------------------ (2) the expectation
def test_the_mean_over_samples_estimates_the_expected_validation_loss_gradient():
    """Validation batches are 2 of the 6 validation rows: the gradient of the expected loss
    over all C(6, 2) = 15 pairs, by hand, against the mean of 400 samples (4 standard errors
    per coordinate; the standard error from the samples computed apart)."""
    samples = 400
    loop = online(regression(steps=4), hd.reverse(), samples=samples, window=2, lr=0.0)
    loop.step()
    state, _, raw, start, stop = window_by_hand(loop)
    grads, _ = separate_samples(loop, samples)
    u = {n: v.detach().clone().requires_grad_() for n, v in raw.items()}
    natural = loop.hparams.natural(u)
    pairs = list(itertools.combinations(range(6), 2))
    expected_loss = sum(_window_by_hand(state.params["w"], state.opt_state.momentum["w"],
                                        natural["lr"], natural["lam"], range(start, stop),
                                        XV[list(pair)], YV[list(pair)])
                        for pair in pairs) / len(pairs)
    expected = torch.stack([g.reshape(()) for g in torch.autograd.grad(
        expected_loss, [u["lr"], u["lam"]])])
    record = loop.step()
    mean = torch.tensor([record.grad["lr"], record.grad["lam"]], dtype=DT)
    standard_error = grads.std(0) / math.sqrt(samples)
    assert torch.all((mean - expected).abs() <= 4 * standard_error), (mean, expected,
                                                                       standard_error)
    # the samples are spread: not one batch repeated (the check above could not fail then)
    assert torch.all(standard_error > 1e-3 * expected.abs())


# ------------------------------------------------------------------ (3) the spread and the SNR
@pytest.mark.parametrize("name", ["reverse", "forward", "curvature"])
def test_the_snr_and_spread_fields_are_those_of_the_samples(name):
    loop = online(regression(), METHODS[name](), samples=5)
    loop.step()
    grads, values = separate_samples(loop, 5)
    record = loop.step()
    mean, std = grads.mean(0), grads.std(0)
    assert record.grad_snr == pytest.approx(float(mean.norm() / (std.norm() / math.sqrt(5))),
                                            rel=1e-10)
    assert record.grad_std == pytest.approx(float(std.norm()), rel=1e-10)
    assert record.grad_norm == pytest.approx(float(mean.norm()), rel=1e-12)
    assert record.val_loss_std == pytest.approx(float(values.std()), rel=1e-10)


def test_one_sample_records_no_snr_and_a_low_snr_is_warned(caplog):
    loop = online(regression(), hd.reverse(), samples=1)
    record = loop.step()
    assert record.samples == 1 and record.grad_snr is None and record.grad_std is None
    noisy = online(regression(), hd.reverse(), samples=2, val_batch_size=1)
    with caplog.at_level("WARNING"):
        records = [noisy.step() for _ in range(2)]
    low = [r for r in records if r.grad_snr is not None and r.grad_snr < 1]
    assert low, [r.grad_snr for r in records]  # one-row batches: a noisy window direction
    assert "the step direction is mostly validation-batch noise; use more samples " \
           "(OnlinePlan(samples=...) or a larger val_batch_size)" in caplog.text


def test_one_sample_is_the_run_without_samples():
    """``samples=1`` draws the validation rows a run drew before samples existed: those of
    ``window_seed(seed, h)``."""
    loop = online(regression(), hd.forward(), samples=1)
    rows = torch.randperm(6, generator=torch.Generator().manual_seed(seeds.window_seed(0, 0)))
    assert torch.equal(loop.plan.val_batches(0, 0)[0][0], XV[rows[:2]])
    assert seeds.window_sample_seed(0, 0, 0) == seeds.window_seed(0, 0)
    assert seeds.window_sample_seed(7, 9, 1) == 733106141871


# ------------------------------------------------------------------ REINFORCE draws per sample
def test_reinforce_samples_train_their_own_draw_and_the_run_continues_with_the_first():
    problem = regression(choice={"baseline": "leave_one_out"})
    loop = online(problem, hd.reverse(), samples=3)
    state, _, raw, start, stop = window_by_hand(loop)
    hook = loop.discrete
    losses, scores, grads = [], [], []
    for j in range(3):
        drawn = hook.prepare(loop.plan.problem, 0, j, raw, anneal_step=0)
        out = hd.reverse().segment(drawn, state, raw, start, stop,
                                   loop.plan.val_batches(loop.seed, 0, j))
        index = drawn.hparams["c"].sample
        probs = torch.softmax(raw["c"].double(), -1)
        losses.append(out.value)
        scores.append(torch.nn.functional.one_hot(torch.tensor(index), 3).double() - probs)
        grads.append(out.grad["lam"])
        if j == 0:
            first = out.state
    hook.drawn = {}
    record = loop.step()
    values = torch.tensor(losses, dtype=DT)
    baseline = (values.sum() - values) / 2  # leave one out: kept online with 3 samples
    expected = ((values - baseline)[:, None] * torch.stack(scores)).mean(0)
    assert torch.allclose(torch.tensor(record.grad["c"], dtype=DT), expected, rtol=1e-12,
                          atol=1e-15)
    assert record.grad["lam"] == pytest.approx(float(torch.stack(grads).mean()), rel=1e-12)
    assert record.discrete["baseline"] == pytest.approx(baseline.tolist(), rel=1e-12)
    assert torch.equal(loop.plan.state.params["w"], first.params["w"])


def test_samples_with_reinforce_evaluate_the_whole_split_when_asked():
    loop = online(regression(choice={"baseline": "moving_average"}), hd.reverse(), samples=2,
                  val_batch_size=None)
    record = loop.step()
    assert record.samples == 2 and len(record.discrete["samples"]["c"]) == 2


# ------------------------------------------------------------------ (4) resume
@pytest.mark.parametrize("name, choice", [("forward", None),
                                          ("reverse", {"baseline": "moving_average"})])
def test_an_interrupted_online_run_with_samples_resumes_exactly(name, choice):
    def make() -> HyperOptimizer:
        return online(regression(steps=12, choice=choice), METHODS[name](), samples=3,
                      window=2)

    whole = make()
    expected = [r.without_timing() for r in whole.run().history]
    assert all(r.samples == 3 and r.grad_snr is not None for r in whole.history)
    for stop in (1, 4):  # interrupted after window 1 or 4 of 6, resumed in a new loop
        interrupted = make()
        while interrupted.step_index < stop:
            interrupted.step()
        resumed = make()
        resumed.load_state_dict(copy.deepcopy(interrupted.state_dict()))
        assert [r.without_timing() for r in resumed.run().history] == expected, stop


# ------------------------------------------------------------------ refusals
def test_identical_samples_are_refused_naming_the_fix():
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: samples must be 1 when "
                       r"every window evaluates the whole validation split "
                       r"\(val_batch_size=None\) and no choice is sampled by REINFORCE: its "
                       r"samples would be identical; set val_batch_size \(val_batch_size\) to "
                       r"draw each sample's validation rows \(got 3\)"):
        online(regression(), hd.reverse(), samples=3, val_batch_size=None)
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: samples must be a positive "
                       r"int \(got 0\)"):
        hd.plans.OnlinePlan(samples=0)


def test_the_cli_refuses_folds_online_and_keeps_a_task_samples_offline():
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import build_online

    config = load_config(overrides=["task.name=ridge_diabetes", "outer.mode=online",
                                    "task.cv_folds=3", "outer.samples=2", "outer.val_batch=8"])
    with pytest.raises(hd.HyperdiffError, match=r"^config: task.cv_folds must be 0 with "
                       r"outer.mode = 'online' \(one training run; cross-validation folds "
                       r"are offline only, outer.samples draws validation samples per window; "
                       r"got 3\)"):
        build_online(config)
    # mlp_digits recommends 2 trainings per offline step; online a window draws 1 sample
    assert load_config(overrides=["task.name=mlp_digits"]).outer.samples == 2
    assert load_config(overrides=["task.name=mlp_digits", "outer.mode=online"]
                       ).outer.samples == 1
    chosen = load_config(overrides=["task.name=mlp_digits", "outer.mode=online",
                                    "outer.samples=3", "outer.val_batch=32"])
    _, loop = build_online(chosen)
    assert loop.plan.samples == 3 and loop.plan.val_batch_size == 32


# ------------------------------------------------------------------ data parallel, 2 ranks
DP_RUNS = {"reverse": hd.reverse, "curvature": lambda: hd.methods.curvature(horizon=20)}


def dp_problem() -> hd.Problem:
    """tests/online_dp_task.py's float64 MLP (2 ranks match one process to 1e-10 there)."""
    import online_dp_task

    return online_dp_task.build().build().problems[0]


def dp_history(method: Any) -> list[dict[str, Any]]:
    """Two windows of 4 steps, 3 samples of 8 validation rows each."""
    loop = online(dp_problem(), method, samples=3, window=4, val_batch_size=8)
    loop.run()
    return [r.without_timing() for r in loop.history]


def job_samples(rank: int, arg: Any, report: Any) -> None:
    for name, make in DP_RUNS.items():
        report(name, pickle.dumps(dp_history(hd.distributed.data_parallel(make()))))


distributed_jobs.JOBS["online_samples"] = job_samples


@pytest.mark.skipif("fork" not in mp.get_all_start_methods()
                    or not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo and the fork start method")
def test_data_parallel_samples_give_the_one_process_run():
    references = {name: dp_history(make()) for name, make in DP_RUNS.items()}
    reports, codes, hung = launch("online_samples", None, timeout=120.0)
    assert not hung and codes == [0, 0], (codes, hung, reports)
    for name, reference in references.items():
        assert len(reference) == 2
        for rank in range(WORLD):
            assert close(pickle.loads(reports[rank, name]), reference, 1e-10), (name, rank)

