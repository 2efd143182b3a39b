"""Offline options that could not act (s40 review): ``confirm`` without a selection split (the
run was the same as without it), ``stopping.extend`` with a cosine outer schedule or
``travel = 0`` (it stopped on the plain budget), and the still-moving warning measured against
a global phase's point (it reported 1799% where the gradient phase moved 5%)."""

from __future__ import annotations

import json

import pytest
from test_online_train_seed import problem

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan

from conftest import sine_data

SELECTION = sine_data(16, 4, seed=3)


def test_confirm_without_a_selection_split_is_refused():
    with pytest.raises(hd.HyperdiffError, match=r"HyperOptimizer: confirm must be 0 without a "
                       r"selection split .* \(got 3\)"):
        HyperOptimizer(problem(), plan=OfflinePlan(explore=0, confirm=3), method=hd.reverse(),
                       stopping=Stopping(max_steps=2)).run()
    HyperOptimizer(problem(), plan=OfflinePlan(explore=0, confirm=3), method=hd.reverse(),
                   selection=SELECTION, stopping=Stopping(max_steps=2)).run()


@pytest.mark.parametrize("options, why", [
    ({"schedule": "cosine"}, "the cosine outer schedule, decayed to 0 at the budget"),
    ({"optimizer": "adam"}, "the cosine outer schedule"),  # adam's auto schedule
    ({"stopping": Stopping(max_steps=3, extend=2, travel=0)}, "stopping.travel = 0"),
])
def test_extend_where_it_cannot_hold_the_budget_is_refused(options, why):
    settings = {"stopping": Stopping(max_steps=3, extend=2), **options}
    with pytest.raises(hd.HyperdiffError, match=rf"HyperOptimizer: stopping.extend must be 0 "
                       rf"with {why}"):
        HyperOptimizer(problem(), plan=OfflinePlan(explore=0), method=hd.reverse(),
                       selection=SELECTION, **settings).run()


def test_the_still_moving_warning_reads_the_gradient_phase_only(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--task", "ridge_diabetes", "--set", "inner.steps=20", "--set",
                 "stop.max_steps=8", "--set", "outer.explore=5", "--set",
                 "outer.explore_when=always", "--set", "report.seeds=1", "--out", str(out)])
    assert code == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    lam = [r["hparams"]["lam"] for r in history]
    assert abs(lam[7] - lam[6]) / lam[6] < 0.1 < abs(lam[7] - lam[5]) / lam[5]  # step 5: a point
    assert "still moving" not in capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert not any("still moving" in w for w in result.get("warnings", []))


@pytest.mark.parametrize("optimizer, advice", [
    ("signstep", "Lower the outer learning rate (lr: signstep moves each value by its "
                 "hypergradient's sign alone, so clipping would not shorten its steps)"),
    ("adam", "Lower the outer learning rate, turn on clipping, or bound"),
])
def test_the_guards_advice_fits_the_outer_optimizer(optimizer, advice):
    """With signstep the guard advised clipping, which reads no sign (a no-op there)."""
    from test_driver import flaky, ridge_problem

    problem, _ = ridge_problem()
    loop = HyperOptimizer(problem, method=flaky({1, 2, 3}), max_failures=3,
                          optimizer=optimizer, stopping=Stopping(max_steps=10))
    with pytest.raises(hd.NonFiniteError, match="3 outer steps in a row failed") as err:
        loop.run()
    assert advice in str(err.value)
