"""Early stopping that waits for a travelling value (``Stopping(travel=k)``, ``stop.travel``).

Checked on a quadratic whose tuned learning rate is known in closed form: from a start 10^4x
too small the validation loss (no selection split here: it ranks the steps) improves by less
than ``min_delta`` for the first steps while signstep carries the rate up; without the rule
the run stops there, with it the run reaches the optimum. A start 20% below the optimum runs
exactly as without the rule, and a resumed run repeats an uninterrupted one. The verdicts of
:func:`travelling` are checked against moves computed by hand.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from types import SimpleNamespace

import pytest
from test_weak_start import UNTRAINED, quadratic
from test_weak_start import A as CURVATURE

import hyperdiff as hd
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan
from hyperdiff.tuner.stopping import settled_since, travelling

STEPS = 1
"""The quadratic of test_weak_start.py with one inner step: train loss a/2 (w - c)^2 by gradient
descent at rate eta from w = 0, validation loss (w - c)^2 / 2, so L(eta) = c^2 (1 - eta a)^2 / 2;
the untrained model's U = c^2 / 2, and the optimum is eta* = 1 / a (L = 0)."""


def loss_at(eta: float) -> float:
    return UNTRAINED * (1 - eta * CURVATURE) ** (2 * STEPS)


def problem(eta: float) -> hd.Problem:
    return quadratic(eta, steps=STEPS)


FAR, GOOD = 1e-4 / CURVATURE, 0.8 / CURVATURE
"""A learning rate 10^4x too small (9.2 log units: signstep at lr 0.05 reaches it in about 22
steps, its scale growing 1.5x a step up to 10) and one 20% below the optimum."""
DELTA = 2e-4 * UNTRAINED
"""``min_delta``: the far start's loss improves by less than this for its first 5 steps (until
eta a is near 1.4e-4), a plateau as a noisy selection loss makes one."""


def loop(eta: float, travel: int, patience: int = 3, max_steps: int = 30) -> HyperOptimizer:
    stopping = Stopping(max_steps=max_steps, patience=patience, min_delta=DELTA, travel=travel)
    return HyperOptimizer(problem(eta), plan=OfflinePlan(explore=0), stopping=stopping)


def lines(result: hd.OptimizeResult) -> list[dict]:
    return [json.loads(r.to_json()) | {"time_s": 0, "step_time_s": 0} for r in result.history]


def test_the_quadratic_matches_its_closed_form():
    record = loop(FAR, 0, max_steps=1).run().history[0]
    assert record.val_loss == pytest.approx(loss_at(FAR), rel=1e-10)


def test_without_the_rule_a_far_start_stops_while_it_travels():
    result = loop(FAR, travel=0).run()
    assert result.stop_reason == "early stopping: no better validation loss for 3 steps"
    assert len(result.history) == 4 and result.best_step == 0
    rates = [r.hparams["lr"] for r in result.history]
    # signstep's moves in log units: lr x scale, the scale 1, 1.5, 2.25 while the sign holds
    assert [math.log(b / a) for a, b in itertools.pairwise(rates)] == pytest.approx(
        [0.05, 0.075, 0.1125], rel=1e-9)
    assert result.best_loss > 0.99 * UNTRAINED


def test_with_the_rule_a_far_start_reaches_the_optimum():
    result = loop(FAR, travel=3).run()
    best_eta = result.history[result.best_step].hparams["lr"]
    assert abs(math.log(best_eta * CURVATURE)) < 0.1  # within 10% of eta* = 1/a
    assert result.best_loss == pytest.approx(loss_at(best_eta), rel=1e-8)
    assert result.best_loss < 0.01 * UNTRAINED
    assert result.stop_reason.startswith("early stopping")  # it settles, then stops


def test_a_good_start_runs_exactly_as_without_the_rule():
    plain, waiting = loop(GOOD, travel=0).run(), loop(GOOD, travel=3).run()
    assert plain.stop_reason == waiting.stop_reason == (
        "early stopping: no better validation loss for 3 steps")
    assert lines(plain) == lines(waiting)
    assert len(lines(plain)) > 5


def test_a_run_that_ends_on_its_budget_is_the_same_with_the_rule():
    """The rule only holds early stopping back (benchmarks/outer_starts.py relies on it)."""
    plain, waiting = (loop(FAR, travel=t, patience=12, max_steps=12).run() for t in (0, 3))
    assert plain.stop_reason == waiting.stop_reason == "budget: 12 outer steps"
    assert lines(plain) == lines(waiting)


@pytest.mark.parametrize("stop_at", [2, 5, 12, 20])
def test_a_resumed_run_repeats_an_uninterrupted_one(stop_at):
    straight = loop(FAR, travel=3).run()
    first = loop(FAR, travel=3)
    while first.step_index < stop_at:
        first.step()
    resumed = loop(FAR, travel=3)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()), history=list(first.history))
    result = resumed.run()
    assert lines(result) == lines(straight)
    assert result.stop_reason == straight.stop_reason


HP = hd.HyperParameters(wd=hd.scalar(0.01), frac=hd.scalar(0.5, (0.0, 1.0)))


def steps(wd=None, frac=None, lr=0.05, failed=()):
    """Records whose ``wd`` moves by the log steps ``wd`` and ``frac`` by the logit steps."""
    count = len(wd or frac)
    log_wd = [math.log(0.01) + sum((wd or [0] * count)[:i]) for i in range(count + 1)]
    logit = [sum((frac or [0] * count)[:i]) for i in range(count + 1)]
    return [SimpleNamespace(step=i, lr=lr, status="failed" if i in failed else "ok",
                            hparams={"wd": math.exp(u), "frac": 1 / (1 + math.exp(-v))})
            for i, (u, v) in enumerate(zip(log_wd, logit, strict=True))]


@pytest.mark.parametrize(("records", "window", "verdict"), [
    (steps(wd=[0.06, 0.06, 0.06]), 3, True),  # 0.18 >= 3 x 0.05
    (steps(wd=[-0.1, -0.03, -0.05]), 3, True),  # downwards: 0.18
    (steps(wd=[0.04, 0.04, 0.04]), 3, False),  # 0.12 < 0.15: slower than the outer lr
    (steps(wd=[0.2, -0.01, 0.2]), 3, False),  # one step back
    (steps(wd=[0.2, 0.0, 0.2]), 3, False),  # a skipped step (signstep's flip)
    (steps(wd=[0.1, 0.1]), 3, False),  # too few records
    (steps(wd=[0.5, 0.1, 0.1, 0.1]), 3, True),  # only the last 3 moves count
    (steps(wd=[0.1, 0.1, 0.1], failed=(2,)), 3, False),  # a failed step moves nothing
    (steps(wd=[0.1, 0.1, 0.1]), 0, False),  # off
    (steps(frac=[0.1, 0.1]), 2, True),  # an interval value, in log-odds
    (steps(frac=[0.1, 0.1], lr=0.2), 2, False),
])
def test_travelling_verdicts(records, window, verdict):
    assert travelling(records, HP, ["wd", "frac"], window) is verdict
    assert travelling(records, HP, [], window) is False  # no watched names


def test_settled_steps_skip_the_travelling_ones_and_the_global_phase():
    records = steps(wd=[0.1, 0.1, 0.1, 0.1, -0.1, 0.1])  # steps 3 and 4 travel, 5, 6 do not
    assert [travelling(records[:end + 1], HP, ["wd"], 3) for end in range(7)] == [
        False, False, False, True, True, False, False]
    assert settled_since(records, 6, 0, HP, ["wd"], 3) == 4
    assert settled_since(records, 6, 0, HP, ["wd"], 0) == 6
    # a gradient phase from step 1 (2): step 3's (and 4's) window reaches back into the points
    assert settled_since(records, 6, 1, HP, ["wd"], 3) == 5
    assert settled_since(records, 6, 2, HP, ["wd"], 3) == 6
    assert settled_since(records, 0, 0, HP, ["wd"], 3) == 0


def test_travel_must_be_a_nonnegative_int():
    with pytest.raises(hd.HyperdiffError, match=r"Stopping: travel must be .* \(got -1\)"):
        Stopping(travel=-1)


def test_a_stored_config_without_stop_travel_reads_as_it_ran(tmp_path):
    from hyperdiff.app.config import legacy_values, load_config

    path = tmp_path / "config.toml"
    path.write_text('[task]\nname = "mlp_digits"\n[stop]\npatience = 10\n')
    assert load_config(path, stored=True).stop.travel == 0  # written before the rule
    path.write_text('[task]\nname = "mlp_digits"\n[stop]\ntravel = 2\n')
    assert load_config(path, stored=True).stop.travel == 2
    assert legacy_values({"stop": {"patience": 3}})["stop"] == {"patience": 3, "travel": 0,
                                                                "extend": 0, "chaos_ratio": 0.0}
    # a new run gets today's default, the library's and the config's alike
    fresh = load_config(data={"task": {"name": "mlp_digits"}})
    assert fresh.stop.travel == Stopping().travel == 3
    assert "stop" not in legacy_values({"outer": {"mode": "offline"}})
