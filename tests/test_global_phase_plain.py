"""The global phase's points train plainly (tuner/global_phase.py, tuner/sampler.py): their
losses against a hand-written unroll, the method's calls, the same run as with hypergradients at
the points, and the gradient phase starting over from the next best point when its first step
fails at the best one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_driver import ridge_problem

import hyperdiff as hd
import hyperdiff.tuner.offline_plan as offline_plan
from hyperdiff.methods.base import Method
from hyperdiff.methods.reverse import reverse
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan


def ridge_val_loss(lam: float, *, n=24, p=4, steps=20, lr=0.1, lam_at=None) -> float:
    """The validation loss of ``ridge_problem(lam=...)`` after its full-batch SGD, unrolled by
    hand in float64: ``w <- w - lr (2 X^T (X w - y) / n + 2 lam w)`` from ``w = 0``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, generator=gen, dtype=torch.float64)
    w_true = torch.randn(p, generator=gen, dtype=torch.float64)
    y = x @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    xv = torch.randn(n, p, generator=gen, dtype=torch.float64)
    yv = xv @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.zeros(p, dtype=torch.float64)
    for _ in range(steps):
        w = w - lr * (2.0 * x.T @ (x @ w - y) / n + 2.0 * lam * w)
    return float(((xv @ w - yv) ** 2).mean())


def counting(inner: Method, failing=lambda raw: False, spare_first=True
             ) -> tuple[Method, list[dict]]:
    """``inner`` with every call's raw values recorded; it raises NonFiniteError (a
    hypergradient that is not finite) where ``failing(raw)``, except at its first call (step
    0's) with ``spare_first``."""
    calls: list[dict] = []

    def run(problem, raw):
        calls.append({n: v.clone() for n, v in raw.items()})
        if (len(calls) > 1 or not spare_first) and failing(raw):
            raise hd.NonFiniteError("test: the hypergradient of 'lam' is not finite")
        return inner.run(problem, raw)

    return Method("counting", run), calls


def loop_with(method, *, explore=3, steps=8, lr=0.3, max_failures=5):
    problem, _ = ridge_problem(lam=0.05)
    return HyperOptimizer(problem, method=method, lr=lr, schedule="cosine", max_failures=max_failures,
                          plan=OfflinePlan(explore=explore, explore_decades=1.0,
                                           explore_when="always"),
                          stopping=Stopping(max_steps=steps, patience=None))


def test_points_record_the_hand_written_unrolls_loss_and_no_hypergradient():
    method, calls = counting(reverse())
    loop = loop_with(method, explore=3, steps=7)
    history = loop.run().history
    for record in history[1:4]:
        assert record.status == "ok"
        assert record.grad is None and record.grad_norm is None and record.grad_snr is None
        assert record.val_loss == pytest.approx(ridge_val_loss(record.hparams["lam"]),
                                                rel=1e-10)
    for record in (history[0], *history[4:]):  # the start and the gradient phase
        assert record.grad is not None and math.isfinite(record.grad_norm)
    # the method ran at step 0 and at each gradient step only; every step counts its training
    assert len(calls) == 1 + 3
    assert [r.trainings for r in history] == list(range(1, 8))


@pytest.mark.parametrize("warm_start", [False])  # s41: warm starts have no global phase
def test_the_run_is_the_one_that_computed_the_points_hypergradients(monkeypatch, warm_start):
    """With minibatches and two samples a step: the same values, losses, best steps and
    outer learning rates as when every point also computes its (unused) hypergradient."""

    def build():
        problem, _ = ridge_problem(lam=0.05, batch_size=6)
        return HyperOptimizer(problem, lr=0.3, schedule="cosine",
                              plan=OfflinePlan(samples=2, explore=4, explore_when="always",
                                               warm_start=warm_start),
                              stopping=Stopping(max_steps=9, patience=None))

    plain = build().run().history
    original = offline_plan.sampled_outcome
    monkeypatch.setattr(offline_plan, "sampled_outcome",
                        lambda loop, sampler, step, raw, plain=False:
                        original(loop, sampler, step, raw, False))
    hypergradients = build().run().history
    assert all(r.grad is not None for r in hypergradients)
    assert [r.grad is None for r in plain] == [False] + [True] * 4 + [False] * 4
    for a, b in zip(plain, hypergradients, strict=True):
        assert (a.hparams, a.val_loss, a.val_loss_std, a.train_loss, a.best, a.trainings,
                a.lr, a.samples) == (b.hparams, b.val_loss, b.val_loss_std, b.train_loss,
                                     b.best, b.trainings, b.lr, b.samples)


def phase_order(history, k):
    """The global phase's successful steps by validation loss (the earlier first on a tie)."""
    ok = [r for r in history[:k + 1] if r.status == "ok"]
    return [r.step for r in sorted(ok, key=lambda r: (r.val_loss, r.step))]


def fails_at(history, steps):
    """``failing(raw)``: whether ``raw`` holds the values of one of ``steps`` (by lam)."""
    bad = [math.log(history[s].hparams["lam"]) for s in steps]
    return lambda raw: any(abs(float(raw["lam"]) - b) < 1e-9 for b in bad)


def test_a_failure_at_the_best_point_starts_the_gradient_phase_over_from_the_next_best():
    k = 4
    reference = loop_with(reverse(), explore=k, steps=10).run().history
    order = phase_order(reference, k)
    method, _ = counting(reverse(), fails_at(reference, order[:2]))
    loop = loop_with(method, explore=k, steps=10)
    history = loop.run().history
    first, second = history[k + 1], history[k + 2]
    assert first.status == "failed" and second.status == "failed"
    assert first.hparams["lam"] == pytest.approx(reference[order[0]].hparams["lam"], rel=1e-12)
    assert f"starts over from the values of step {order[1]}" in first.message
    assert second.hparams["lam"] == pytest.approx(reference[order[1]].hparams["lam"], rel=1e-12)
    assert f"starts over from the values of step {order[2]}" in second.message
    third = history[k + 3]
    assert third.status == "ok"
    assert third.hparams["lam"] == pytest.approx(reference[order[2]].hparams["lam"], rel=1e-12)
    # neither failure cut the outer learning rate: the cosine's first value at step k + 3
    assert loop.guard.scale == 1.0 and loop.guard.total_failures == 2
    assert third.lr == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * 2 / 5)), rel=1e-12)
    assert loop.best["step"] == order[0]  # still the best loss seen


def test_a_failure_at_the_last_start_point_is_an_ordinary_one():
    k = 1
    reference = loop_with(reverse(), explore=k, steps=6).run().history
    order = phase_order(reference, k)
    method, _ = counting(reverse(), fails_at(reference, order))
    loop = loop_with(method, explore=k, steps=6, max_failures=3)
    with pytest.raises(hd.NonFiniteError, match="3 outer steps in a row failed"):
        loop.run()
    history = loop.history
    assert [r.status for r in history[2:]] == ["failed"] * 4
    assert "starts over from the values of step" in history[2].message
    # the failures at the last start point count, cut the outer lr and come back to it
    for record in history[3:]:
        assert "starts over" not in record.message
        assert record.hparams["lam"] == pytest.approx(reference[order[1]].hparams["lam"],
                                                      rel=1e-12)
    assert loop.guard.scale == 0.5 ** 3  # each of the 3 counted, the one that gives up too


@pytest.mark.parametrize("stop_at", [5, 6, 7])
def test_a_resumed_run_starts_over_as_the_straight_one(stop_at):
    k = 4
    reference = loop_with(reverse(), explore=k, steps=10).run().history
    failing = fails_at(reference, [s for s in phase_order(reference, k) if s != 0][:2])

    def build():
        return loop_with(counting(reverse(), failing, spare_first=False)[0], explore=k,
                         steps=10)

    straight = build().run().history
    assert "starts over" in straight[k + 1].message
    first = build()
    while first.step_index < stop_at:
        first.step()
    resumed = build()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()), history=list(first.history))
    resumed.run()
    assert [r.without_timing() for r in resumed.history] == [r.without_timing()
                                                             for r in straight]


def test_a_run_directory_logs_and_plots_the_plain_points(tmp_path):
    from hyperdiff.app.config import load_config
    from hyperdiff.app.experiment import run_experiment
    from hyperdiff.app.plots import plot_run
    from hyperdiff.app.rundir import RunDir

    config = load_config(overrides=[  # 4 inner steps: a weak start, so the phase runs
        "task.name=mlp_digits", "inner.steps=4", "outer.explore=2", "stop.max_steps=5",
        "report.seeds=1", "log.csv=steps.csv"])
    run_experiment(config, out=tmp_path / "run", log=lambda _: None, progress=False)
    records = RunDir(tmp_path / "run").read_history()
    assert [r.grad is None for r in records] == [False, True, True, False, False]
    assert records[1].message.startswith("global phase: point 1 of 2")
    with open(tmp_path / "run" / "steps.csv") as handle:
        rows = handle.read().splitlines()
    header = rows[0].split(",")
    cells = [dict(zip(header, line.split(","), strict=False)) for line in rows[1:]]
    assert [c["grad_norm"] == "" for c in cells] == [False, True, True, False, False]
    assert len(plot_run(tmp_path / "run", tmp_path / "plots")) >= 3


def test_with_auto_samples_a_point_draws_the_minimum():
    """Its signal-to-noise ratio would measure a hypergradient that nothing follows."""
    problem, _ = ridge_problem(lam=0.05, batch_size=6)
    loop = HyperOptimizer(problem, lr=0.3, stopping=Stopping(max_steps=5, patience=None),
                          plan=OfflinePlan(samples="auto", max_samples=6, explore=2,
                                           explore_when="always"))
    history = loop.run().history
    assert [r.samples for r in history[1:3]] == [2, 2]
    assert history[2].trainings - history[0].trainings == 4
    assert history[0].grad_snr is not None and history[1].grad_snr is None
    assert history[1].val_loss_std > 0  # two minibatch orders, two losses


def test_a_data_parallel_method_keeps_the_points_hypergradients():
    """Its collectives keep the ranks' losses equal; a plain training shards nothing and runs
    on every rank alone (in one process the method runs unsharded)."""
    problem, _ = ridge_problem(lam=0.05)
    loop = HyperOptimizer(problem, method=hd.distributed.data_parallel("reverse"), lr=0.3,
                          stopping=Stopping(max_steps=4, patience=None),
                          plan=OfflinePlan(explore=2, explore_when="always"))
    assert all(r.grad is not None for r in loop.run().history)
