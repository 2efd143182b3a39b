"""A new best confirmed on other minibatch seeds (``OfflinePlan(confirm=c)``, ``outer.confirm``).

On a small tanh network trained by SGD on minibatches with a per-step noise factor (the problem
of test_online_train_seed.py), every step of a run with ``confirm = 2`` is checked against
trainings written out by hand: a step whose own selection loss beats the best so far (the best
recomputed here from the confirmed means) records the mean of it and of two hand-written
trainings at the seeds ``confirm_seed(seed, step, k)``, any other step its own loss; the values
follow the run without confirmations step for step (the confirmations give no hypergradient),
and the trainings count the extra ones. A resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_online_train_seed import DT, noise, problem, train_loss, val_loss

import hyperdiff as hd
from hyperdiff.engine.models import StepContext
from hyperdiff.seeds import confirm_seed
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan

from conftest import sine_data

SELECTION = sine_data(16, 4, seed=3)
SEED, STEPS = 0, 10


def loop(confirm: int, samples: int = 1, **options: Any) -> HyperOptimizer:
    """The run of this module (``options``: more of the plan's, e.g. ``common_seed``)."""
    plan = OfflinePlan(explore=0, confirm=confirm, samples=samples, **options)
    return HyperOptimizer(problem(), plan=plan, method=hd.reverse(), lr=0.3,
                          selection=SELECTION, seed=SEED,
                          stopping=Stopping(max_steps=STEPS, patience=None))


def selection_by_hand(values: dict[str, float], seed: int) -> float:
    """SGD written out by hand at the record's lr and wd with minibatch seed ``seed``, then the
    mean squared error on the selection split."""
    prob = problem()
    lr, wd = (torch.tensor(values[k], dtype=DT) for k in ("lr", "wd"))
    theta = {k: v.clone() for k, v in prob.params.items()}
    for t in range(prob.steps):
        p = {k: v.clone().requires_grad_() for k, v in theta.items()}
        ctx = StepContext(step=t, seed=seed, train=True, buffers={})
        loss = train_loss(p, {"wd": wd}, prob.train_data.batch(t, seed), ctx)
        grads = torch.autograd.grad(loss, list(p.values()))
        theta = {k: v - lr * g for (k, v), g in zip(theta.items(), grads, strict=True)}
    with torch.no_grad():
        return float(val_loss(theta, None, SELECTION))


def test_the_noise_makes_the_seeds_differ():
    values = {"lr": 0.2, "wd": 1e-2}
    assert abs(selection_by_hand(values, 1) - selection_by_hand(values, 2)) > 1e-4
    assert noise(StepContext(step=0, seed=1, train=True, buffers={})) != noise(
        StepContext(step=0, seed=2, train=True, buffers={}))


def test_every_step_against_trainings_by_hand():
    plain, checked = loop(0).run(), loop(2).run()
    best, confirmed_steps, disappointed = None, 0, 0
    for p, c in zip(plain.history, checked.history, strict=True):
        assert c.hparams == p.hparams and c.grad == p.grad  # the same values and updates
        own = p.selection_loss
        if best is None or own < best:
            extra = [selection_by_hand(c.hparams, confirm_seed(SEED, c.step, k))
                     for k in range(2)]
            expected = (own + sum(extra)) / 3
            confirmed_steps += 1
        else:
            expected = own
        assert c.selection_loss == pytest.approx(expected, rel=1e-10, abs=1e-12)
        if best is None or expected < best:
            best = expected
            assert c.best
        else:
            assert not c.best
            disappointed += own < best  # the best by its own loss, not by the mean
        assert c.trainings == c.step + 1 + 2 * confirmed_steps
    assert 2 <= confirmed_steps < STEPS  # some steps confirmed, not all
    assert disappointed >= 1
    assert checked.best_loss == best


def test_the_confirmations_change_the_best_step_of_this_run():
    plain, checked = loop(0).run(), loop(2).run()
    assert (plain.best_step, checked.best_step) == (4, 1)


@pytest.mark.parametrize("stop_at", [1, 4, 7])
def test_a_resumed_run_repeats_an_uninterrupted_one(stop_at):
    straight = loop(2).run()
    first = loop(2)
    while first.step_index < stop_at:
        first.step()
    resumed = loop(2)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()), history=list(first.history))
    result = resumed.run()
    assert [r.without_timing() for r in result.history] == [
        r.without_timing() for r in straight.history]


@pytest.mark.parametrize(("options", "message"), [
    ({"confirm": -1}, r"HyperOptimizer: confirm must be .* \(got -1\)"),
    ({"confirm": 1.5}, r"HyperOptimizer: confirm must be .* \(got 1.5\)"),
])
def test_bad_confirm_is_refused(options, message):
    with pytest.raises(hd.HyperdiffError, match=message):
        OfflinePlan(**options)


def test_confirm_with_warm_starts_is_refused():
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: confirm must be 0 with "
                       r"warm_start .* \(got 1\)"):
        HyperOptimizer(problem(), plan=OfflinePlan(confirm=1, warm_start=True),
                       selection=SELECTION)


def test_a_chaotic_step_is_not_confirmed():
    """At a chaos ratio that makes some steps chaotic, only calm steps are confirmed (a step's
    trainings jump by 1 + confirm where it was), where without the rule a chaotic one was."""

    def run(ratio):
        plan = OfflinePlan(explore=0, confirm=2)
        return HyperOptimizer(problem(), plan=plan, method=hd.reverse(), lr=0.3,
                              selection=SELECTION, seed=SEED,
                              stopping=Stopping(max_steps=STEPS, patience=None,
                                                chaos_ratio=ratio)).run().history

    def confirmed(history):
        counts = [r.trainings for r in history]
        return {r.step for r, before in zip(history, [0, *counts], strict=False)
                if r.trainings - before == 3}

    def chaotic(record, ratio):
        return record.grad_norm > ratio * max(abs(record.val_loss), 1.0)

    free = run(None)
    ratios = sorted(r.grad_norm / max(abs(r.val_loss), 1.0) for r in free)
    ratio = ratios[len(ratios) // 2]
    assert any(chaotic(free[s], ratio) for s in confirmed(free))  # the rule has work to do
    ruled = run(ratio)
    assert confirmed(ruled) and not any(chaotic(ruled[s], ratio) for s in confirmed(ruled))
