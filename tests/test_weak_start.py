"""The global phase after a weak start (``explore_when="weak"``, the default): a start whose
training removed less than a fifth of the untrained model's loss, or whose hypergradient is
steep against what it removed. Checked on a quadratic whose tuned learning rate is known in
closed form, against the verdicts computed by hand, and for exactness and resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hyperdiff as hd
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.global_phase import STEEP_RATIO, WEAK_FRACTION, weak_start
from hyperdiff.tuner.offline_plan import OfflinePlan

DT = torch.float64
A, C, T = 2.0, 1.0, 10
"""Train loss a/2 (w - c)^2 by gradient descent at rate eta from w = 0 for T steps, validation
loss (w - c)^2 / 2: w_T - c = -c (1 - eta a)^T, so L(eta) = c^2 (1 - eta a)^(2T) / 2, the
untrained model's U = c^2 / 2 and the optimum eta* = 1/a (L = 0)."""
UNTRAINED = C * C / 2


def closed_loss(eta: float) -> float:
    return UNTRAINED * (1 - eta * A) ** (2 * T)


def closed_grad(eta: float) -> float:
    """dL / d(log eta) = -T c^2 (eta a) (1 - eta a)^(2T - 1)."""
    return -T * C * C * eta * A * (1 - eta * A) ** (2 * T - 1)


def quadratic(eta: float, steps: int = T) -> hd.Problem:
    """The problem above, with ``steps`` inner steps (T by default)."""
    def train_loss(params, h, batch):
        return 0.5 * A * ((params["w"] - C) ** 2).sum()

    def val_loss(params, h, batch):
        return 0.5 * ((params["w"] - C) ** 2).sum()

    dummy = (torch.zeros(1, 1, dtype=DT), torch.zeros(1, dtype=DT))
    return hd.make_problem(train_loss, val_loss, hd.HyperParameters(lr=hd.scalar(eta)),
                           {"w": torch.zeros(1, dtype=DT)}, optimizer=hd.sgd("lr"),
                           train_data=dummy, val_data=dummy, steps=steps)


def run(eta: float, when: str = "weak", explore: int = 4, steps: int = 8) -> hd.OptimizeResult:
    plan = OfflinePlan(explore=explore, explore_decades=2.0, explore_when=when)
    return loop(eta, plan, steps).run()


def loop(eta: float, plan: OfflinePlan, steps: int = 8) -> HyperOptimizer:
    return HyperOptimizer(quadratic(eta), plan=plan, stopping=Stopping(max_steps=steps))


SMALL, GOOD, STEEP = 0.01 / A, 0.5 / A, 1.9 / A
"""A learning rate 100x too small (removes 1 - 0.99^20 = 18% of U), a good one (removes all but
0.5^20) and one near the edge of stability (|1 - eta a| = 0.9: removes 88%, but the
hypergradient is 5.9x that)."""


def test_the_quadratic_matches_its_closed_form():
    for eta in (SMALL, GOOD, STEEP):
        record = run(eta, when="broken", explore=0, steps=1).history[0]
        assert record.val_loss == pytest.approx(closed_loss(eta), rel=1e-10)
        assert record.grad["lr"] == pytest.approx(closed_grad(eta), rel=1e-8)


def test_a_start_100x_too_small_gets_the_phase_and_reaches_the_optimum():
    weak = run(SMALL)
    removed = 1 - (1 - SMALL * A) ** (2 * T)  # 0.182
    assert weak.history[0].message == (
        f"global phase: the start (the start trained to validation loss "
        f"{closed_loss(SMALL):.3g}, {removed:.1%} below the untrained model's "
        f"{UNTRAINED:.3g} (less than 20%))")
    assert weak.history[1].message.startswith("global phase: point 1 of 4")
    # the same budget without the phase: signstep travels about 2 of the 4.6 log units
    plain = run(SMALL, when="broken")
    assert [r.message for r in plain.history] == [""] * 8
    best_eta = weak.history[weak.best_step].hparams["lr"]
    assert abs(math.log(best_eta * A)) < 0.7  # within a factor 2 of eta* = 1/a
    assert weak.best_loss == pytest.approx(closed_loss(best_eta), rel=1e-8)
    assert weak.best_loss < 1e-3 * UNTRAINED < plain.best_loss


def test_a_good_start_runs_exactly_as_without_the_rule():
    runs = [run(GOOD, when=when) for when in ("weak", "broken")] + [run(GOOD, explore=0)]
    lines = [[(r.hparams, r.val_loss, r.grad, r.message) for r in result.history]
             for result in runs]
    assert lines[0] == lines[1] == lines[2]
    assert len(lines[0]) == 8 and all(message == "" for *_, message in lines[0])


def test_a_steep_start_gets_the_phase():
    history = run(STEEP).history
    removed = UNTRAINED - closed_loss(STEEP)
    norm = abs(closed_grad(STEEP))
    assert norm > STEEP_RATIO * removed
    assert history[0].message == (
        f"global phase: the start (its hypergradient norm {norm:.3g} is above 5 x the "
        f"validation loss its training removed ({removed:.3g}): steep)")
    assert run(STEEP, when="broken").history[0].message == ""


@pytest.mark.parametrize("stop_at", [1, 3, 6])
def test_a_resumed_run_repeats_the_decision(stop_at):
    straight = run(SMALL)
    first = loop(SMALL, OfflinePlan(explore=4))
    while first.step_index < stop_at:
        first.step()
    state = copy.deepcopy(first.state_dict())
    assert state["explored"] is True
    resumed = loop(SMALL, OfflinePlan(explore=4))
    resumed.load_state_dict(state, history=list(first.history))
    result = resumed.run()
    assert [(r.hparams, r.val_loss, r.message) for r in result.history] == [
        (r.hparams, r.val_loss, r.message) for r in straight.history]


def rec(selection=None, val=None, norm=None):
    return type("Record", (), {"selection_loss": selection, "val_loss": val,
                               "grad_norm": norm})()


@pytest.mark.parametrize(("record", "untrained", "verdict"), [
    # removed 25% of the selection loss: not weak; 19%: weak
    (rec(0.75, 0.8, 0.1), {"validation": 1.0, "selection": 1.0}, ""),
    (rec(0.81, 0.5, 0.1), {"validation": 1.0, "selection": 1.0}, "weak"),
    # no selection split: the validation loss decides
    (rec(None, 1.9, 0.1), {"validation": 2.0}, "weak"),
    (rec(None, 1.0, 0.1), {"validation": 2.0}, ""),
    # steep: norm above 5 x (U - L) on the validation split, at or below: not
    (rec(0.5, 0.5, 2.6), {"validation": 1.0, "selection": 1.0}, "steep"),
    (rec(0.5, 0.5, 2.5), {"validation": 1.0, "selection": 1.0}, ""),
    # no verdict without a positive finite reference or a finite loss
    (rec(None, -3.0, 0.1), {"validation": -2.0}, ""),
    (rec(0.9, 0.9, 0.1), {"validation": math.nan, "selection": math.nan}, ""),
    (rec(None, math.inf, 0.1), {"validation": 1.0}, ""),
    (rec(0.5, 0.5, None), {"validation": 1.0, "selection": 1.0}, ""),
])
def test_weak_start_verdicts(record, untrained, verdict):
    found = weak_start(record, untrained)
    assert (found.endswith("steep") if verdict == "steep" else
            f"(less than {WEAK_FRACTION:.0%})" in found if verdict == "weak" else found == "")
