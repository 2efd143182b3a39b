"""Issue 18, class 9: the divergence guard on a finite but absurd start.

SGD on the quadratic ``L(w) = 1/2 sum_i a_i (w_i - 1)^2`` from ``w = 0`` is stable for
``lr < 2 / L`` with ``L = max_i a_i``; after T steps ``w_i - 1 = -(1 - lr a_i)^T``, so the loss
is known in closed form (:func:`closed_form_loss`, the oracle). At 3x the limit the start has
diverged to a finite but absurd loss; it must fail at step 0 as an infinite loss does.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hyperdiff as hd
from hyperdiff.tuner.driver import HyperOptimizer
from hyperdiff.tuner.global_phase import explore_points
from hyperdiff.tuner.guard import DivergenceGuard
from hyperdiff.tuner.offline_plan import OfflinePlan

# the deprecated shim is what these tests exercise (they predate the one loop)
pytestmark = pytest.mark.filterwarnings(
    "ignore:hd.online.OnlineTuner is deprecated:DeprecationWarning")

DT = torch.float64
CURVATURES = (4.0, 1.0, 0.25)  # the Hessian's eigenvalues: L = 4, stability limit 2 / L
LIMIT = 2.0 / max(CURVATURES)
STEPS = 40


def closed_form_loss(lr: float, steps: int, scale: float = 1.0) -> float:
    """``L(w_T)`` of SGD from ``w = 0`` toward ``scale * 1``: ``1/2 sum a_i scale^2 (1 - lr
    a_i)^(2T)``."""
    return 0.5 * sum(a * scale**2 * (1.0 - lr * a) ** (2 * steps) for a in CURVATURES)


def quadratic(lr: float, steps: int = STEPS, scale: float = 1.0) -> hd.Problem:
    a = torch.tensor(CURVATURES, dtype=DT)

    def loss(params, h, target):
        w = params["w"] - target
        return 0.5 * (a * w * w).sum()

    target = torch.full((len(CURVATURES),), scale, dtype=DT)
    return hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(lr)),
                           {"w": torch.zeros(len(CURVATURES), dtype=DT)},
                           optimizer=hd.sgd("lr"), train_data=target, val_data=target,
                           steps=steps)


def offline(problem: hd.Problem) -> HyperOptimizer:
    """The guard alone: no global phase after the broken start (see
    test_the_default_global_phase_rescues_a_diverged_start)."""
    return HyperOptimizer(problem, lr=0.01, plan=OfflinePlan(explore=0),
                          stopping=hd.Stopping(max_steps=4))


def online(problem: hd.Problem) -> hd.online.OnlineTuner:
    return hd.online.OnlineTuner(problem, window=STEPS, lr=0.01)


def start_message(caller: str) -> str:
    return f"{caller}: the initial hyperparameters already fail at step 0: "


@pytest.mark.parametrize(("caller", "loop"), [("HyperOptimizer", offline),
                                              ("OnlineTuner", online)])
def test_a_start_at_three_times_the_stability_limit_fails_at_step_0(caller, loop):
    untrained = closed_form_loss(0.0, STEPS)
    diverged = closed_form_loss(3 * LIMIT, STEPS)
    assert math.isfinite(diverged) and diverged > 1e3 * untrained  # the oracle's case
    with pytest.raises(hd.NonFiniteError) as caught:
        loop(quadratic(3 * LIMIT)).run()
    message = str(caught.value)
    assert message.startswith(start_message(caller))
    assert f"the validation loss {diverged:.3g} is absurd" in message
    assert f"the untrained model's loss| {untrained:.3g}" in message


@pytest.mark.parametrize(("caller", "loop"), [("HyperOptimizer", offline),
                                              ("OnlineTuner", online)])
def test_an_infinite_start_fails_with_the_same_message(caller, loop):
    with pytest.raises(hd.NonFiniteError, match=f"^{start_message(caller)}"):
        loop(quadratic(1e6 * LIMIT, steps=200)).run()


def test_half_the_stability_limit_runs_normally():
    result = offline(quadratic(0.5 * LIMIT)).run()
    assert [r.status for r in result.history] == ["ok"] * 4
    assert result.history[0].val_loss == pytest.approx(closed_form_loss(0.5 * LIMIT, STEPS),
                                                       rel=1e-10)
    tuner = hd.online.OnlineTuner(quadratic(0.5 * LIMIT), window=5, lr=0.01)
    assert {r.status for r in tuner.run().history} == {"ok"}


def test_a_first_loss_at_the_overflow_scale_fails_whatever_the_untrained_loss():
    """Targets at 1e14: the untrained loss is ~1e28, and 1.1x the limit for 12 steps grows it
    past 1e30 but less than 1e3 x: the overflow rule, not the ratio, fails it."""
    lr, steps, scale = 1.1 * LIMIT, 12, 1e14
    untrained, trained = closed_form_loss(0.0, steps, scale), closed_form_loss(lr, steps, scale)
    assert 1e30 < trained < 1e3 * untrained
    with pytest.raises(hd.NonFiniteError, match=r"is absurd: above 1e\+30, the scale of an "
                                                r"overflow"):
        offline(quadratic(lr, steps, scale)).run()


def test_the_start_rule_uses_the_tighter_ratio_and_is_off_with_the_guard():
    untrained = {"validation": 2.0}
    with pytest.raises(hd.NonFiniteError, match=r"more than 10 x max\(\|the untrained"):
        DivergenceGuard(max_loss_ratio=10).check_losses([21.0], None, lambda: untrained)
    DivergenceGuard(max_loss_ratio=10).check_losses([19.0], None, lambda: untrained)
    off = DivergenceGuard(max_loss_ratio=math.inf)
    off.check_losses([1e35], None, lambda: untrained)
    assert off.reference == {"validation": 1e35}


def test_the_default_global_phase_rescues_a_diverged_start():
    """With the default plan (8 points after a broken start, +-2 decades) the start at 3x the
    stability limit goes on to the points instead of ending the run: every point below the
    limit trains to its closed-form loss, and the result is one of them."""
    result = HyperOptimizer(quadratic(3 * LIMIT), lr=0.01,
                            stopping=hd.Stopping(max_steps=12)).run()
    history = result.history
    assert history[0].status == "failed"
    assert history[0].message.startswith("global phase: the start: step 0 failed (the "
                                         "validation loss")
    stable = [r for r in history[1:9] if r.hparams["lr"] < LIMIT]
    assert stable and all(r.status == "ok" for r in stable)
    for r in stable:
        assert r.val_loss == pytest.approx(closed_form_loss(r.hparams["lr"], STEPS), rel=1e-10)
    best_lr = result.history[result.best_step].hparams["lr"]
    assert best_lr < LIMIT
    assert result.best_loss == pytest.approx(closed_form_loss(best_lr, STEPS), rel=1e-10)


def test_a_budget_that_ends_in_failed_points_names_the_start():
    """An infinite start whose points (within +-2 decades) all diverge too: the run ends after
    its 4 steps with one error that says so, not "no result"."""
    with pytest.raises(hd.NonFiniteError, match=r"^HyperOptimizer: all 4 outer steps failed, "
                       r"the start and the global phase's points tried after it; step 0: "
                       r"global phase: the start: step 0 failed \("):
        HyperOptimizer(quadratic(1e6 * LIMIT, steps=200), lr=0.01,
                       stopping=hd.Stopping(max_steps=4)).run()


def seven_failures_in_a_row(steps: int = 12) -> HyperOptimizer:
    return HyperOptimizer(quadratic(30 * LIMIT), lr=0.01, seed=4,
                          stopping=hd.Stopping(max_steps=steps))


def test_failed_points_of_the_global_phase_do_not_end_the_run():
    """Outer seed 4 orders the 8 points so that the failed start and the first 6 points all
    diverge (each at least 1e3x the untrained loss by the closed form) and point 7 (lr 0.31)
    is stable: the phase is independent trials, so those 7 failures in a row must neither end
    the run (the guard's limit is 5) nor cut the outer learning rate. Point 7 trains to its
    closed-form loss and the gradient phase goes on from it."""
    steps = 12
    start = hd.HyperParameters(lr=hd.scalar(30 * LIMIT))
    points = explore_points(start, start.raw, 8, 2.0, seed=4)
    lrs = [float(p["lr"].exp()) for p in points]
    untrained = closed_form_loss(0.0, STEPS)
    assert all(closed_form_loss(lr, STEPS) > 1e3 * untrained for lr in lrs[:6])  # the case
    assert lrs[6] < LIMIT
    loop = seven_failures_in_a_row(steps)
    result = loop.run()
    statuses = [r.status for r in result.history]
    assert statuses[:7] == ["failed"] * 7 and statuses[7] == "ok"
    assert result.history[7].hparams["lr"] == pytest.approx(lrs[6], rel=1e-12)
    assert result.history[7].val_loss == pytest.approx(closed_form_loss(lrs[6], STEPS),
                                                       rel=1e-10)
    assert all("does not count toward the failures in a row" in r.message
               for r in result.history[1:7])
    assert len(result.history) == steps and loop.guard.total_failures == statuses.count("failed")
    assert loop.guard.scale == 0.5 ** sum(s == "failed" for s in statuses[9:])  # gradient only
    assert result.history[result.best_step].hparams["lr"] < LIMIT


@pytest.mark.parametrize("stop_at", [3, 7, 10])
def test_a_run_resumed_among_uncounted_failures_repeats_the_straight_one(stop_at):
    """The checkpoint's guard counts only the failures that count (none in the phase): a run
    stopped inside the failed points, just after them and in the gradient phase resumes to
    the straight run."""
    straight = seven_failures_in_a_row().run()
    first = seven_failures_in_a_row()
    while first.step_index < stop_at:
        first.step()
    assert first.guard.failures == sum(r.status == "failed" for r in first.history[9:])
    resumed = seven_failures_in_a_row()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()), history=list(first.history))
    result = resumed.run()
    assert [r.hparams for r in result.history] == [r.hparams for r in straight.history]
    assert [r.val_loss for r in result.history] == [r.val_loss for r in straight.history]
    assert [r.message for r in result.history] == [r.message for r in straight.history]
