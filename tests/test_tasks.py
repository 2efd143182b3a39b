"""Built-in tasks: data, splits, black-box interface, and short tuning runs that must help."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.config import OuterConfig
from hyperdiff.app.tasks import TASKS, build_task, list_tasks, load_task_spec, ridge, task_defaults
from hyperdiff.app.tasks.reweight import flipped_rows
from hyperdiff.app.tasks.splits import fold_rows, split_rows
from hyperdiff.engine.training import train, validation_loss
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.outer_steps import DEFAULT_OFFLINE

REPORT_SEEDS = (101, 102)



def tune(task, **kwargs):
    """A short run with the task's outer settings (its recommended ones over the defaults)."""
    defaults = task_defaults(task.name)
    options = {"optimizer": defaults.get("outer.optimizer", DEFAULT_OFFLINE),
               "lr": defaults.get("outer.lr", OuterConfig().lr), "selection": task.selection,
               "seed": 3}
    options.update(kwargs)
    steps = options.pop("max_steps")
    return HyperOptimizer(list(task.problems), stopping=Stopping(max_steps=steps, patience=None),
                          **options).run()


def test_splits_are_disjoint_and_cover_the_data():
    s = split_rows(100, test=0.25, val=0.2, selection_fraction=0.5, seed=0)
    parts = [s.train, s.val, s.selection, s.test]
    assert [len(p) for p in parts] == [55, 10, 10, 25]
    assert torch.cat(parts).sort().values.tolist() == list(range(100))


def test_classification_splits_and_folds_are_stratified():
    """Every split and fold keeps the class shares (oracle: the shares of the whole set)."""
    labels = torch.arange(200) % 4  # four classes of 50
    s = split_rows(200, test=0.2, val=0.2, selection_fraction=0.5, seed=3, labels=labels)
    for rows in (s.train, s.val, s.selection, s.test):
        counts = torch.bincount(labels[rows], minlength=4)
        assert int(counts.max() - counts.min()) <= 1, counts
    pool = torch.cat([s.train, s.val]).sort().values
    folds = fold_rows(pool, 4, seed=3, labels=labels)
    held = torch.cat([va for _, va in folds])
    assert held.sort().values.tolist() == pool.tolist()  # each pool row validated once
    for tr, va in folds:
        assert set(tr.tolist()).isdisjoint(va.tolist())
        counts = torch.bincount(labels[va], minlength=4)
        assert int(counts.max() - counts.min()) <= 1, counts


def test_the_selection_split_must_leave_validation_rows():
    with pytest.raises(hd.HyperdiffError, match="at least one row"):
        build_task("ridge_diabetes", selection_fraction=0.999)


def test_registry_lists_every_task():
    assert [row[0] for row in list_tasks()] == list(TASKS)
    with pytest.raises(hd.HyperdiffError, match="must be one of"):
        build_task("nope")


def test_black_box_interface():
    task = build_task("ridge_diabetes", steps=30)
    assert set(task.search_space) == set(task.hparams)
    out = task.train_and_evaluate({"lam": 0.3}, seed=0)
    assert set(out) == {"val_loss", "selection_loss", "test_loss"}
    # oracle: plain training at lam = 0.3 and the test mean squared error
    raw = task.hparams.with_natural(lam=0.3).raw
    state, _ = train(task.final_problem, raw)
    x, y = task.splits["test"][0]
    assert out["test_loss"] == pytest.approx(float(((x @ state.params["w"] - y) ** 2).mean()))


def test_ridge_inner_training_reaches_the_closed_form():
    task = build_task("ridge_diabetes")
    x, y = task.final_problem.train_data.data
    state, _ = train(task.final_problem, task.hparams.with_natural(lam=0.2).raw)
    exact = ridge.closed_form(x, y, 0.2)
    assert float((state.params["w"] - exact).norm() / exact.norm()) < 1e-3


def test_ridge_tuned_lam_matches_the_grid_argmin():
    """Hypergradient descent vs a zero-order oracle: the argmin of the validation loss over a
    log grid refined by golden-section search, with the same T-step training."""
    task = build_task("ridge_diabetes", steps=100, selection_fraction=0.0)
    problem = task.problems[0]

    def val(log_lam: float) -> float:
        raw = {"lam": torch.tensor(log_lam, dtype=torch.float64)}
        state, _ = train(problem, raw)
        return float(validation_loss(problem, state.params, state.buffers,
                                     problem.hparams.view(raw)))

    grid = np.linspace(math.log(1e-3), math.log(10.0), 13)
    i = int(np.argmin([val(g) for g in grid]))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    while b - a > 1e-3:
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        a, b = (a, d) if val(c) < val(d) else (c, b)
    grid_lam = math.exp((a + b) / 2)

    # the task's budget: signstep travels the 3.5 log units from lam = 0.01 by step ~20
    result = tune(task, selection=None, max_steps=30, schedule="cosine")
    tuned = float(result.best_hparams.natural()["lam"])
    final = math.exp(float(result.final_raw["lam"]))
    assert abs(tuned / grid_lam - 1) < 0.02, (tuned, grid_lam)
    assert abs(final / grid_lam - 1) < 0.02, (final, grid_lam)
    assert 1e-2 < grid_lam < 1.0  # interior: regularization matters here


@pytest.mark.parametrize(
    ("name", "steps", "max_steps"),
    [("ridge_diabetes", 100, 8), ("logistic_cancer", 60, 8), ("mlp_digits", 30, 6)],
)
def test_short_run_lowers_the_validation_loss(name, steps, max_steps):
    task = build_task(name, steps=steps)
    result = tune(task, max_steps=max_steps)
    before = task.evaluate(seeds=REPORT_SEEDS)
    after = task.evaluate(result.best_raw, seeds=REPORT_SEEDS)
    assert after["val"]["loss"] < before["val"]["loss"]


@pytest.fixture(scope="module")
def reweighting():
    task = build_task("reweight_digits", steps=30)
    return task, tune(task, max_steps=8)


def test_reweighting_lowers_the_validation_loss(reweighting):
    task, result = reweighting
    before = task.evaluate(seeds=(0,))
    after = task.evaluate(result.best_raw, seeds=(0,))
    assert after["val"]["loss"] < before["val"]["loss"]
    assert task.hparams.numel == task.info["sizes"]["train"] > 900
    assert task_defaults("reweight_digits") == dict(load_task_spec("reweight_digits").defaults)


def test_reweighting_down_weights_the_flipped_examples(reweighting):
    task, result = reweighting
    weight = result.best_hparams.natural()["weight"]
    spec = load_task_spec("reweight_digits", steps=30)
    rows = split_rows(1797, test=0.25, val=0.2, selection_fraction=0.5, seed=0,
                         labels=spec.data[1])
    flipped = flipped_rows(hd.tasks.TaskData(spec.data, rows, 0))
    assert 0.25 < float(flipped.double().mean()) < 0.35
    assert float(weight[flipped].mean()) < float(weight[~flipped].mean())
    summary = task.summarize({"weight": weight})
    assert summary["mean weight, flipped labels"] < summary["mean weight, clean labels"]


def test_cross_validation_folds_partition_the_pool():
    task = build_task("logistic_cancer", steps=20, cv_folds=3)
    assert len(task.problems) == 3
    held = torch.cat([p.val_data[0][1] for p in task.problems])
    train_rows = task.final_problem.train_data.data[1]
    assert len(held) == len(train_rows)  # every pool row is validated on exactly once
    result = tune(task, max_steps=3)
    losses = result.history.column("val_loss")
    assert losses[-1] < losses[0]


def test_reweighting_refuses_cross_validation():
    with pytest.raises(hd.HyperdiffError, match="cv_folds must be 0"):
        build_task("reweight_digits", cv_folds=3)
