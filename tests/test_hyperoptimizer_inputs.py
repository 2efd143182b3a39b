"""Inputs that used to be ignored or fail with a raw Python error (s42 new-user review): a
``DataLoader``'s ``drop_last`` in an evaluation split (``val_data``, a task's test and given
selection splits) was dropped, so the loader's short last batch was evaluated and a loader
with no batch at all was evaluated whole; ``HyperOptimizer`` given a task, ``None``, a dict
as ``stopping`` or a plan's name raised ``TypeError`` / ``AttributeError``, and a
``warm_start`` or ``progress`` that is no bool, or a callback of the wrong arity, slipped
through; a task ``batch_size`` above the train split's rows blamed ``minibatches`` and a row
count the user never gave."""

from __future__ import annotations

import re
from unittest.mock import MagicMock

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hyperdiff as hd
from hyperdiff.engine.data import validation_batches
from hyperdiff.engine.data.evaluation import evaluation_split

D = torch.float64


def rows(n: int, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D)
    return x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=D)[:d] + 0.1


def val_loss(p, h, b):
    return ((b[0] @ p["w"] - b[1]) ** 2).mean()


def train_loss(p, h, b):
    return val_loss(p, h, b) + h["wd"] * p["w"].square().sum()


def problem(val_data=None, steps: int = 3) -> hd.Problem:
    return hd.make_problem(train_loss, val_loss, hd.HyperParameters(wd=hd.scalar(0.1)),
                           {"w": torch.zeros(3, dtype=D)}, optimizer=hd.sgd(0.1),
                           train_data=rows(12),
                           val_data=rows(6, seed=1) if val_data is None else val_data,
                           steps=steps)


# ---------------------------------------------------------------- drop_last in evaluation splits
@pytest.mark.parametrize("shuffle", [False, True])
def test_validation_loader_with_drop_last_reads_only_its_full_batches(shuffle):
    x, y = rows(10, seed=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=shuffle, drop_last=True)
    assert sum(len(b[0]) for b in loader) == 8  # what the loader itself yields
    batches = validation_batches(loader)
    assert len(batches) == 2  # samples 0..7 in index order, the short batch (8, 9) dropped
    for j, (bx, by) in enumerate(batches):
        assert torch.equal(bx, x[4 * j:4 * j + 4]) and torch.equal(by, y[4 * j:4 * j + 4])


def test_hypergradient_over_a_drop_last_loader_is_that_of_its_full_batches():
    x, y = rows(10, seed=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)
    got = hd.hypergradient(train_loss, val_loss, hd.HyperParameters(wd=hd.scalar(0.1)),
                           {"w": torch.zeros(3, dtype=D)}, optimizer=hd.sgd(0.1),
                           train_data=rows(12), val_data=loader, steps=3)
    # the reference: the same problem on the 8 rows as one batch, and its value by hand
    ref = hd.hypergradient(train_loss, val_loss, hd.HyperParameters(wd=hd.scalar(0.1)),
                           {"w": torch.zeros(3, dtype=D)}, optimizer=hd.sgd(0.1),
                           train_data=rows(12), val_data=(x[:8], y[:8]), steps=3)
    xt, yt = rows(12)
    w = torch.zeros(3, dtype=D)
    for _ in range(3):  # SGD on the train loss with wd = 0.1, written out
        w = w - 0.1 * (2 * xt.T @ (xt @ w - yt) / 12 + 2 * 0.1 * w)
    assert got.value == pytest.approx(float(((x[:8] @ w - y[:8]) ** 2).mean()), rel=1e-12)
    assert got.value == pytest.approx(ref.value, rel=1e-12)  # two batches' mean vs one batch
    torch.testing.assert_close(got.grad["wd"], ref.grad["wd"], rtol=1e-12, atol=0)


def test_a_drop_last_loader_with_no_full_batch_is_refused():
    x, y = rows(6)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, drop_last=True)
    assert list(loader) == []
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "data: the validation split must hold at least one full batch of the DataLoader's "
            "batch_size 8 with drop_last=True (got 6 samples, so the loader yields no batch); "
            "pass drop_last=False or a batch_size of at most 6")):
        problem(val_data=loader)


def test_lazy_test_split_honours_drop_last_and_keeps_the_short_batch_without_it():
    x, y = rows(10, seed=3)
    dropped = evaluation_split("test", DataLoader(TensorDataset(x, y), batch_size=4,
                                                  drop_last=True))
    assert (len(dropped), dropped.num_samples) == (2, 8)
    assert torch.equal(torch.cat([b[0] for b in dropped]), x[:8])
    kept = evaluation_split("test", DataLoader(TensorDataset(x, y), batch_size=4))
    assert (len(kept), kept.num_samples) == (3, 10)  # the control: no drop_last, all rows
    assert torch.equal(torch.cat([b[0] for b in kept]), x)


def test_a_tasks_given_selection_and_test_loaders_honour_drop_last():
    (xv, yv), (xs, ys), (xt, yt) = rows(6, seed=4), rows(7, seed=5), rows(9, seed=6)
    spec = hd.task("dl", model={"w": torch.zeros(3, dtype=D)}, train_loss=train_loss,
                   val_loss=val_loss, hparams=hd.HyperParameters(wd=hd.scalar(0.1)),
                   optimizer=hd.sgd(0.1), steps=2, data=hd.given_splits(
                       train=rows(12), val=(xv, yv),
                       selection=DataLoader(TensorDataset(xs, ys), batch_size=3, drop_last=True),
                       test=DataLoader(TensorDataset(xt, yt), batch_size=4, drop_last=True)))
    task = spec.build()
    assert task.info["sizes"]["selection"] == 6 and task.info["sizes"]["test"] == 8
    assert torch.equal(torch.cat([b[0] for b in task.splits["selection"]]), xs[:6])
    assert torch.equal(torch.cat([b[0] for b in task.splits["test"]]), xt[:8])


# ---------------------------------------------------------------- HyperOptimizer's arguments
def built_task(batch_size: int | None = None, n: int = 40):
    return hd.task("lin", model={"w": torch.zeros(3, dtype=D)}, train_loss=train_loss,
                   val_loss=val_loss, hparams=hd.HyperParameters(wd=hd.scalar(0.1)),
                   optimizer=hd.sgd(0.1), data=rows(n), steps=2, batch_size=batch_size,
                   probe=False)


def test_a_task_given_as_the_problem_names_its_problems_and_selection():
    task = built_task().build()
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "HyperOptimizer: problem must be a Problem or a non-empty sequence of Problems "
            "(made by hd.make_problem); for a task pass its problems and selection split: "
            "HyperOptimizer(list(task.problems), selection=task.selection) (got the task Task "
            "'lin')")):
        hd.HyperOptimizer(task)
    # what the message says works
    hd.HyperOptimizer(list(task.problems), selection=task.selection)


def test_an_unbuilt_task_spec_says_to_build_it():
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "build the task first: task = spec.build(), then HyperOptimizer(list(task.problems), "
            "selection=task.selection) (got the unbuilt TaskSpec 'lin')")):
        hd.HyperOptimizer(built_task())


@pytest.mark.parametrize("value", [None, 5, 2.5, object()])
def test_a_problem_that_is_not_iterable_is_refused_by_name(value):
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: problem must be a Problem or "
                       r"a non-empty sequence of Problems \(made by hd.make_problem\) \(got "):
        hd.HyperOptimizer(value)


@pytest.mark.parametrize(("stopping", "hint"), [
    ({"max_steps": 2}, "; for a dict of rules: hd.Stopping(**rules) (got {'max_steps': 2})"),
    (5, " (got 5)"), (True, " (got True)"),
    (hd.Stopping, " (got <class 'hyperdiff.tuner.stopping.Stopping'>)"),
])
def test_stopping_that_is_not_a_stopping_is_refused(stopping, hint):
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "HyperOptimizer: stopping must be None or hd.Stopping(...), e.g. "
            f"hd.Stopping(max_steps=20, patience=5){hint}")):
        hd.HyperOptimizer(problem(), stopping=stopping)


def test_a_dict_of_rules_unpacked_into_stopping_runs():
    result = hd.HyperOptimizer(problem(), stopping=hd.Stopping(**{"max_steps": 2})).run()
    assert result.steps == 2


@pytest.mark.parametrize("plan", ["online", 5, {}, hd.reverse()])
def test_a_plan_that_is_no_plan_names_the_plans(plan):
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "HyperOptimizer: plan must be None or a plan instance, e.g. "
            "hd.plans.OfflinePlan(...) or hd.plans.OnlinePlan(...) (got ")):
        hd.HyperOptimizer(problem(), plan=plan)


def test_a_plan_object_lacking_members_lists_them():
    class HalfPlan:
        caller = "HalfPlan"

        def bind(self, loop):
            pass

    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "(this one lacks begin, commit, counts_failure, default_optimizer and 21 more of "
            "hyperdiff.tuner.plan.Plan) (got ")):
        hd.HyperOptimizer(problem(), plan=HalfPlan())


def test_the_plans_are_still_taken():
    for plan in (hd.plans.OfflinePlan(), hd.plans.OnlinePlan(2)):
        assert hd.HyperOptimizer(problem(steps=4), plan=plan).plan is plan


@pytest.mark.parametrize("warm_start", ["yes", 1, None])
def test_warm_start_must_be_a_bool(warm_start):
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            f"HyperOptimizer: warm_start must be True or False (got {warm_start!r})")):
        hd.HyperOptimizer(problem(), warm_start=warm_start)
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            f"OfflinePlan: warm_start must be True or False (got {warm_start!r})")):
        hd.plans.OfflinePlan(warm_start=warm_start)  # built directly: not coerced by bool()


def test_a_callback_of_the_wrong_arity_is_refused_before_the_first_step():
    loop = hd.HyperOptimizer(problem(), stopping=hd.Stopping(max_steps=1))

    def on_record(record):
        pass

    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "HyperOptimizer.run: callbacks[1] must be a function taking two arguments, "
            "callback(optimizer, record) (got test_a_callback_of_the_wrong_arity_is_refused_"
            "before_the_first_step.<locals>.on_record(record))")):
        loop.run(callbacks=[lambda opt, rec: None, on_record])
    assert loop.step_index == 0


def test_callbacks_of_any_fitting_signature_are_called():
    seen: list[int] = []

    class Watcher:
        def __call__(self, optimizer, record, extra=None):
            seen.append(record.step)

    mock = MagicMock()
    hd.HyperOptimizer(problem(), stopping=hd.Stopping(max_steps=2)).run(
        callbacks=[Watcher(), lambda *args: seen.append(-1), mock, print.__call__])
    assert seen == [0, -1, 1, -1] and mock.call_count == 2


def test_progress_must_be_a_bool_or_none():
    loop = hd.HyperOptimizer(problem(), stopping=hd.Stopping(max_steps=1))
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "HyperOptimizer.run: progress must be True, False or None (a bar only on a "
            "terminal) (got 'yes')")):
        loop.run(progress="yes")


# ---------------------------------------------------------------- a task's batch_size
def test_a_batch_size_above_the_train_split_names_the_task_and_how_the_rows_arose():
    # 40 rows: round(0.25 * 40) = 10 test, round(0.2 * 40) = 8 validation, 22 to train on
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "task lin: batch_size must be at most the 22 rows of the train split (of the 40 "
            "rows of data: test_fraction 0.25 holds out 10 and val_fraction 0.2 8) (got 23); "
            "lower batch_size, or pass batch_size=None to train on the full batch")):
        built_task(batch_size=23).build()
    built_task(batch_size=22).build()  # the control: the whole train split as one batch


def test_a_batch_size_above_a_folds_train_rows_names_the_fold():
    # 40 rows: 22 train and 8 validation rows pooled, in 3 folds of 10: each trains on 20
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "task lin: batch_size must be at most the 20 rows of the cross-validation fold 0's "
            "train split (of the 30 train and validation rows in cv_folds=3 folds;")):
        built_task(batch_size=21).build(cv_folds=3, selection_fraction=0.0)


def test_a_batch_size_above_given_train_rows_names_given_splits():
    spec = hd.task("given", model={"w": torch.zeros(3, dtype=D)}, train_loss=train_loss,
                   val_loss=val_loss, hparams=hd.HyperParameters(wd=hd.scalar(0.1)),
                   optimizer=hd.sgd(0.1), steps=2, batch_size=13, probe=False,
                   data=hd.given_splits(train=rows(12), val=rows(6, seed=1),
                                        test=rows(5, seed=2)))
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "task given: batch_size must be at most the 12 rows of the given_splits' train "
            "split (got 13)")):
        spec.build(selection_fraction=0.0)


@pytest.mark.parametrize("batch_size", [3, 8, 13])
def test_a_selection_cut_from_a_drop_last_val_loader_cuts_the_loaders_full_batches(batch_size):
    # 20 rows: the loader yields 18, 16, 13 of them; both parts together are exactly those
    x, y = rows(20, seed=7)
    x = x + torch.arange(20, dtype=D)[:, None] * 100  # each row tells its index
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, drop_last=True)
    yielded = torch.cat([b[0] for b in loader])
    task = build_cut(loader)
    got = torch.cat([b[0] for split in ("val", "selection") for b in task.splits[split]])
    order = got[:, 0].argsort()
    assert torch.equal(got[order], yielded)  # the loader's rows, each once, none other
    whole = build_cut(DataLoader(TensorDataset(x, y), batch_size=batch_size))  # the control
    assert sum(len(b[0]) for s in ("val", "selection") for b in whole.splits[s]) == 20


def build_cut(loader):
    return hd.task("cut", model={"w": torch.zeros(3, dtype=D)}, train_loss=train_loss,
                   val_loss=val_loss, hparams=hd.HyperParameters(wd=hd.scalar(0.1)),
                   optimizer=hd.sgd(0.1), steps=2,
                   data=hd.given_splits(train=rows(12), val=loader,
                                        test=rows(5, seed=8))).build(selection_fraction=0.5)
