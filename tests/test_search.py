"""Black-box search baselines (hyperdiff.app.search) and the logistic_digits task."""

from __future__ import annotations

import math

import pytest
import torch

from hyperdiff.app import search
from hyperdiff.app.search import dimensions, from_history, random_search, tpe_search
from hyperdiff.app.tasks import build_task
from hyperdiff.errors import HyperdiffError
from hyperdiff.tuner.driver import HyperOptimizer, Stopping


@pytest.fixture(scope="module")
def ridge():
    return build_task("ridge_diabetes", steps=20)


@pytest.fixture(scope="module")
def digits():
    return build_task("logistic_digits", steps=10)


def test_random_search_respects_budget_and_seed(ridge):
    a = random_search(ridge, 4, seed=3)
    b = random_search(ridge, 4, seed=3)
    c = random_search(ridge, 4, seed=4)
    assert len(a.trials) == 4 and a.trainings == 4
    assert [t.trainings for t in a.trials] == [1, 2, 3, 4]
    assert [t.values for t in a.trials] == [t.values for t in b.trials]
    assert [t.objective for t in a.trials] == [t.objective for t in b.trials]
    assert [t.values for t in a.trials] != [t.values for t in c.trials]
    rng = ridge.search_space["lam"]
    assert all(rng.low <= t.values["lam"] <= rng.high for t in a.trials)
    times = [t.time_s for t in a.trials]
    assert times == sorted(times)


def test_trial_objective_is_the_task_validation_loss(ridge):
    """Oracle: train_and_evaluate called directly at the trial's values."""
    result = random_search(ridge, 2, seed=0)
    for trial in result.trials:
        direct = ridge.train_and_evaluate({"lam": trial.values["lam"]}, seed=0)
        assert trial.objective == pytest.approx(direct["val_loss"], rel=1e-12)
    assert result.best.objective == min(t.objective for t in result.trials)
    curve = result.curve()
    assert curve["best"] == [min(curve["best"][: i + 1]) for i in range(2)]
    assert curve["best"][-1] == result.best.objective


def test_per_coordinate_search_has_one_dimension_per_feature(digits):
    assert len(dimensions(digits)) == 1
    dims = dimensions(digits, per_coordinate=["lam"])
    assert len(dims) == 64 and dims[5].label == "lam[5]"
    result = random_search(digits, 2, seed=1, per_coordinate=["lam"])
    lam = result.trials[0].values["lam"]
    assert isinstance(lam, list) and len(lam) == 64 and len(set(lam)) == 64
    with pytest.raises(HyperdiffError, match="per_coordinate must name"):
        dimensions(digits, per_coordinate=["nope"])


def test_bad_budget_is_refused(ridge):
    with pytest.raises(HyperdiffError, match="budget must be a positive int"):
        random_search(ridge, 0)


def test_tpe_without_optuna_says_how_to_install(ridge, monkeypatch):
    monkeypatch.setattr(search, "optuna_available", lambda: False)
    with pytest.raises(HyperdiffError, match="hyperdiff\\[search\\]"):
        tpe_search(ridge, 2)


@pytest.mark.skipif(not search.optuna_available(), reason="optuna not installed")
def test_tpe_search_is_seeded(ridge):
    a, b = tpe_search(ridge, 3, seed=2), tpe_search(ridge, 3, seed=2)
    assert [t.values for t in a.trials] == [t.values for t in b.trials]
    assert a.method == "tpe" and a.trainings == 3


def test_logistic_digits_builds_and_hypergradient_descent_lowers_val_loss(digits):
    assert digits.hparams.numel == 64
    assert sum(v.numel() for v in digits.problems[0].params.values()) == 650
    sizes = digits.info["sizes"]
    assert sum(sizes.values()) == 1797 and sizes["selection"] > 0
    opt = HyperOptimizer(list(digits.problems), lr=0.5, stopping=Stopping(max_steps=3))
    result = opt.run()
    curve = from_history(result.history)
    assert curve.trainings == 3 and len(curve.trials) == 3
    assert curve.trials[-1].objective < curve.trials[0].objective
    # the history's val loss is the black-box objective at the same values (full batch)
    values = {"lam": torch.tensor(result.history[0].hparams["lam"], dtype=torch.float64)}
    direct = digits.train_and_evaluate(values, seed=0)["val_loss"]
    assert math.isclose(curve.trials[0].objective, direct, rel_tol=1e-9)
