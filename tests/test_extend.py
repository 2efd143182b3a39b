"""A budget that waits for a travelling value (``Stopping(extend=e)``, ``stop.extend``).

On the quadratic of test_travel.py (tuned learning rate 1/a in closed form) from a start
10^4x too small, whose rate signstep carries up for about 22 steps: a budget of 12 steps stops
it on the way; with ``extend`` the run goes on exactly while the moves of the last ``travel``
steps, recomputed here by hand from the records, all point one way and add up to at least the
outer learning rate a step, and ends next to the optimum. A run that stops early, or on a cosine
schedule, runs exactly as without the rule; a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
from test_travel import DELTA, FAR, GOOD, UNTRAINED, lines, loss_at, problem
from test_weak_start import A as CURVATURE

import hyperdiff as hd
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan

BUDGET = 12


def loop(eta: float, extend: int, patience: int = 40, schedule: str = "auto",
         travel: int = 3) -> HyperOptimizer:
    stopping = Stopping(max_steps=BUDGET, patience=patience, min_delta=DELTA, travel=travel,
                        extend=extend)
    return HyperOptimizer(problem(eta), plan=OfflinePlan(explore=0), stopping=stopping,
                          schedule=schedule)


def travels_by_hand(records, window: int = 3) -> bool:
    """The last ``window`` moves of log(lr) all one way, by at least 0.05 (the outer lr) each
    on average."""
    logs = [math.log(r.hparams["lr"]) for r in records[-(window + 1):]]
    moves = [b - a for a, b in itertools.pairwise(logs)]
    one_way = all(m > 0 for m in moves) or all(m < 0 for m in moves)
    return len(moves) == window and one_way and abs(sum(moves)) >= window * 0.05


def test_the_budget_waits_while_the_rate_travels_and_stops_when_it_settles():
    plain, waiting = loop(FAR, extend=0).run(), loop(FAR, extend=30).run()
    assert plain.stop_reason == f"budget: {BUDGET} outer steps"
    steps = len(waiting.history)
    assert BUDGET < steps < BUDGET + 30
    assert waiting.stop_reason == (f"budget: {BUDGET} outer steps + {steps - BUDGET} while a "
                                   "value travelled (stop.extend = 30)")
    assert lines(waiting)[:BUDGET] == lines(plain)  # the first 12 steps are the plain run's
    records = list(waiting.history)
    # every step past the budget was taken because the rate travelled; the last did not
    assert all(travels_by_hand(records[:m]) for m in range(BUDGET, steps))
    assert not travels_by_hand(records)
    best_eta = records[waiting.best_step].hparams["lr"]
    assert waiting.best_loss == pytest.approx(loss_at(best_eta), rel=1e-8)
    # it stops one step after overshooting 1/a (a flip), its best step 16% below it
    assert waiting.best_loss < 0.03 * UNTRAINED and plain.best_loss > 0.99 * UNTRAINED
    assert abs(math.log(best_eta * CURVATURE)) < 0.2


def test_the_extension_is_capped():
    result = loop(FAR, extend=3).run()
    assert len(result.history) == BUDGET + 3
    assert result.stop_reason == (f"budget: {BUDGET} outer steps + 3 while a value travelled "
                                  "(stop.extend = 3)")
    assert travels_by_hand(list(result.history))  # it still travelled: the cap stopped it


@pytest.mark.parametrize(("eta", "options"), [
    (GOOD, {"patience": 3}),  # stops early: the budget is never reached
])
def test_runs_the_rule_does_not_touch_are_the_same(eta, options):
    """(benchmarks/outer_starts.py takes an early-stopped baseline row for the extended one.)
    A cosine schedule or travel = 0, where it could never act, is refused since s40
    (tests/test_offline_option_inputs.py)."""
    plain, waiting = loop(eta, extend=0, **options).run(), loop(eta, extend=20, **options).run()
    assert lines(plain) == lines(waiting)
    assert plain.stop_reason == waiting.stop_reason


@pytest.mark.parametrize("stop_at", [5, BUDGET, BUDGET + 2])
def test_a_resumed_run_repeats_an_uninterrupted_one(stop_at):
    straight = loop(FAR, extend=30).run()
    first = loop(FAR, extend=30)
    while first.step_index < stop_at:
        first.step()
    resumed = loop(FAR, extend=30)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()), history=list(first.history))
    result = resumed.run()
    assert lines(result) == lines(straight)
    assert result.stop_reason == straight.stop_reason


@pytest.mark.parametrize(("steps", "travels", "reason"), [
    (9, True, None),
    (10, False, "budget: 10 outer steps"),
    (10, True, None),
    (12, True, None),
    (13, True, "budget: 10 outer steps + 3 while a value travelled (stop.extend = 3)"),
    (12, False, "budget: 10 outer steps + 2 while a value travelled (stop.extend = 3)"),
])
def test_the_budget_reason(steps, travels, reason):
    stopping = Stopping(max_steps=10, patience=None, extend=3)
    assert stopping.reason(steps=steps, elapsed=0.0, since_best=0, has_selection=True,
                           travels=travels) == reason


def test_extend_must_be_a_nonnegative_int():
    with pytest.raises(hd.HyperdiffError, match=r"Stopping: extend must be .* \(got -1\)"):
        Stopping(extend=-1)


def test_a_stored_config_without_stop_extend_reads_as_it_ran(tmp_path):
    from hyperdiff.app.config import legacy_values, load_config

    path = tmp_path / "config.toml"
    path.write_text('[task]\nname = "mlp_digits"\n[stop]\ntravel = 3\n')
    assert load_config(path, stored=True).stop.extend == 0  # written before the rule
    path.write_text('[task]\nname = "mlp_digits"\n[stop]\ntravel = 3\nextend = 7\n')
    assert load_config(path, stored=True).stop.extend == 7
    assert legacy_values({"stop": {"travel": 3}})["stop"] == {"travel": 3, "extend": 0,
                                                              "chaos_ratio": 0.0}


def test_a_meta_run_refuses_stop_extend():
    from hyperdiff.app.config import load_config

    with pytest.raises(hd.HyperdiffError, match=r"stop.extend must be left at its default"):
        load_config(overrides=["task.name=sinusoid_maml", "outer.mode=meta", "stop.extend=5"])
