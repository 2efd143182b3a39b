"""Offline options that could not act (s40 review): ``confirm`` without a selection split (the
run was the same as without it), ``stopping.extend`` with a cosine outer schedule or
``travel = 0`` (it stopped on the plain budget), and the still-moving warning measured against
a global phase's point (it reported 1799% where the gradient phase moved 5%)."""

from __future__ import annotations

import itertools
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

    problem, _ = ridge_problem()  # one failure, at values the outer step moved to
    loop = HyperOptimizer(problem, method=flaky({1}), max_failures=1,
                          optimizer=optimizer, stopping=Stopping(max_steps=10))
    with pytest.raises(hd.NonFiniteError, match="1 outer steps in a row failed") as err:
        loop.run()
    assert advice in str(err.value)


@pytest.mark.parametrize("options, message", [
    ({"clip": 1.0}, r"clip must be None with optimizer='signstep' \(it moves each value by its "
                    r"hypergradient's sign alone"),
    ({"normalize": True}, r"normalize must be False with optimizer='signstep'"),
])
def test_clipping_or_normalizing_signstep_is_refused(options, message):
    """Both gave the history of the run without them, line for line."""
    with pytest.raises(hd.HyperdiffError, match="HyperOptimizer: " + message):
        HyperOptimizer(problem(), optimizer="signstep", **options)
    HyperOptimizer(problem(), optimizer="adam", **options)


def test_a_flipped_sign_is_not_taken_for_convergence():
    """signstep skips a coordinate's step where its sign flips: a raw step of exactly 0, which
    step_tol read as convergence (a run stopped at its first flip, its values still moving
    0.5 log units a step). Its step lengths lr x scale are at least 0.01 lr."""
    from test_driver import ridge_problem

    problem_, _ = ridge_problem(lam=0.001)
    loop = HyperOptimizer(problem_, optimizer="signstep", schedule="constant",
                          stopping=Stopping(max_steps=25, patience=None, step_tol=1e-9))
    result = loop.run()
    grads = [r.grad["lam"] for r in result.history]
    assert any(a * b < 0 for a, b in itertools.pairwise(grads))  # a flip happened
    assert result.stop_reason == "budget: 25 outer steps"
    coarse = HyperOptimizer(ridge_problem(lam=0.001)[0], optimizer="signstep",
                            schedule="constant",
                            stopping=Stopping(max_steps=25, patience=None, step_tol=1.0))
    assert coarse.run().stop_reason.startswith("converged: ")  # every length 0.05 x scale < 1
