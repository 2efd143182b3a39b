"""A task's own inputs (the s40 review of app/tasks): what ``hd.task``, ``build_task`` and a
task's functions get is checked, and nothing is read differently from what was given.

Covered: ``build_task(params=)`` checked against the factory's annotations as the config is
(1); ``stratify`` only True / False / None (2); ``given_splits`` that share rows refused (3);
stratified folds kept when one class is rarer than the folds, and refused with an explicit
``stratify=True`` when no class can be stratified (4); metrics and ``summarize`` results
checked at report time, a failing report leaving the tuned steps resumable (5); ``hd.task``'s
arguments refused by name at definition or build, ``prepare`` that drops rows (6);
``data_seed`` up to 2**32 - 1, the derived seeds wrapped and the splits below unchanged (7);
split messages that name float targets and fractions that leave no training rows (8); a
non-finite loss at theta_0 refused, the divergence warning not blaming the tuned values when
the initial ones diverge too (9); ``arch_digits_gumbel`` / ``_reinforce`` named as themselves
(10); the docs' table of built-in tasks listing every one (11); a summary key only one side
has shown as ``-`` in the table.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import diverged_retraining, format_table
from hyperdiff.app.tasks import TASKS, build_task
from hyperdiff.app.tasks.loader import forget_specs
from hyperdiff.app.tasks.splits import fold_rows, split_rows

D = torch.float64
N = 60
X = torch.linspace(-1, 1, 3 * N, dtype=D).reshape(N, 3).sin() * torch.arange(1, N + 1,
                                                                             dtype=D)[:, None]
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=D)


def mse(p, h, b):
    return ((b[0] @ p["w"] - b[1]) ** 2).mean()


def ridge(p, h, b):
    return mse(p, h, b) + h["lam"] * p["w"].square().sum()


def spec(**kw):
    args = {"model": {"w": torch.zeros(3, dtype=D)}, "train_loss": ridge, "val_loss": mse,
            "hparams": hd.HyperParameters(lam=hd.scalar(0.1)), "optimizer": hd.sgd(0.01),
            "data": (X, Y), "steps": 3, **kw}
    return hd.task("toy", **args)


def classes(n=80, rare=3):
    """Labels 0 (most), 1 (36 rows) and 2 (``rare`` rows), with inputs."""
    y = torch.zeros(n, dtype=torch.long)
    y[:36], y[36:36 + rare] = 1, 2
    x = torch.linspace(-1, 1, 4 * n, dtype=D).reshape(n, 4).cos()
    return x, y


def classifier(y_x, **kw):
    x, y = y_x

    def ce(p, h, b):
        return F.cross_entropy(b[0] @ p["w"], b[1])

    return hd.task("cls", model={"w": torch.zeros(4, 3, dtype=D)},
                   train_loss=lambda p, h, b: ce(p, h, b) + h["lam"] * p["w"].square().sum(),
                   val_loss=ce, hparams=hd.HyperParameters(lam=hd.scalar(0.1)),
                   optimizer=hd.sgd(0.1), data=(x, y), steps=2, **kw)


# --- 1. build_task(params=) is checked against the factory's annotations ---------------------

@pytest.mark.parametrize("params, message", [
    ({"meta_sgd": "no"}, "task sinusoid_maml: params.meta_sgd must be of type bool (got 'no')"),
    ({"shots": 2.0}, "task sinusoid_maml: params.shots must be of type int (got 2.0)"),
])
def test_build_task_params_are_checked_against_the_annotations(params, message):
    with pytest.raises(hd.HyperdiffError, match=f"^{re.escape(message)}$"):
        build_task("sinusoid_maml", steps=2, params=params)


def test_the_config_path_keeps_its_message_for_a_mistyped_param():
    with pytest.raises(hd.HyperdiffError, match=r"^config: task\.params\.meta_sgd must be of "
                       r"type bool \(got 'no'\)$"):
        load_config(overrides=["task.name=sinusoid_maml", "task.params.meta_sgd='no'"])


def test_a_well_typed_param_still_builds():
    assert "lr" in build_task("sinusoid_maml", steps=2, params={"meta_sgd": True}).hparams


# --- 2. stratify takes True, False or None only -------------------------------------------------

@pytest.mark.parametrize("value", [0, 1, "no", "false"])
def test_stratify_other_than_a_bool_or_none_is_refused(value):
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "task cls: stratify must be True, False or None (stratify whenever the labels are "
            f"integers) (got {value!r})")):
        classifier(classes(), stratify=value)


# --- 3. given splits that share rows -----------------------------------------------------------

def test_given_splits_that_share_rows_are_refused_naming_splits_and_counts():
    data = hd.given_splits(train=(X[:40], Y[:40]), val=(X[:20], Y[:20]),
                           test=(X[20:40], Y[20:40]), selection=(X[:10], Y[:10]))
    with pytest.raises(hd.HyperdiffError) as info:
        spec(data=data).build()
    assert str(info.value).startswith(
        "toy: given_splits' train, val, selection and test must not share rows (got 20 of the "
        "val split's 20 rows are in the train split; 10 of the selection split's 10 rows are "
        "in the train split; 20 of the test split's 20 rows are in the train split; 10 of the "
        "selection split's 10 rows are in the val split): ")
    assert "allow_shared_rows=True" in str(info.value)


def test_a_test_split_in_a_list_of_batches_sharing_one_row_is_counted():
    data = hd.given_splits(train=(X[:40], Y[:40]), val=(X[40:50], Y[40:50]),
                           test=[(X[50:], Y[50:]), (X[39:40], Y[39:40])])
    with pytest.raises(hd.HyperdiffError, match=r"\(got 1 of the test split's 11 rows are in "
                       r"the train split\)"):
        spec(data=data).build(selection_fraction=0)


def test_disjoint_or_allowed_shared_splits_build():
    disjoint = hd.given_splits(train=(X[:30], Y[:30]), val=(X[30:45], Y[30:45]),
                               test=(X[45:], Y[45:]))
    assert spec(data=disjoint).build().info["sizes"]["test"] == 15
    shared = hd.given_splits(train=(X[:40], Y[:40]), val=(X[30:50], Y[30:50]),
                             test=(X[:20], Y[:20]), allow_shared_rows=True)
    assert spec(data=shared).build().info["sizes"]["test"] == 20
    with pytest.raises(hd.HyperdiffError, match=r"allow_shared_rows must be True or False "
                       r"\(got 'yes'\)"):
        hd.given_splits(train=(X, Y), val=(X, Y), test=(X, Y), allow_shared_rows="yes")


# --- 4. stratified folds with a rare class ------------------------------------------------------

@pytest.mark.parametrize("stratify", [True, None])
def test_folds_keep_every_class_share_when_one_class_is_rarer_than_the_folds(stratify):
    x, y = classes()
    task = classifier((x, y), stratify=stratify).build(cv_folds=3, selection_fraction=0)
    pool = torch.cat([task.splits["train"][0][1], task.splits["val"][0][1]])
    totals = torch.bincount(pool, minlength=3)
    for problem in task.problems:
        counts = torch.bincount(problem.val_data[0][1], minlength=3)
        assert (counts >= totals // 3).all() and (counts <= -(-totals // 3)).all(), counts


def test_explicit_stratify_with_no_class_as_big_as_the_folds_is_refused():
    labels = torch.arange(12) // 2  # six classes of two rows
    pool = torch.arange(12)
    assert len(fold_rows(pool, 3, 0, labels)) == 3  # automatic: unstratified folds
    with pytest.raises(hd.HyperdiffError, match=r"^task: stratify=True needs a class with at "
                       r"least cv_folds = 3 rows in the cross-validation pool to stratify the "
                       r"folds \(got at most 2 rows in each of 6 classes\); lower task.cv_folds"):
        fold_rows(pool, 3, 0, labels, stratify=True)


# --- 5. metrics and summarize results at report time --------------------------------------------

def trained(p):
    return bool(p["w"].abs().sum() > 0)


@pytest.mark.parametrize("returned, message", [
    ({"loss": "x"}, "task toy: metrics must return a dict {name: number}; entry 'loss' is 'x' "
                    "on batch 0 of the train split"),
    (None, "task toy: metrics must return a non-empty dict {name: number} (got None on batch 0 "
           "of the train split)"),
    ({"other": 1.0}, "task toy: metrics must return a 'loss' entry, which the report and "
                     "black-box search (hyperdiff compare) read on each split (got the keys "
                     "['other'] on batch 0 of the train split)"),
])
def test_metrics_that_go_wrong_after_training_are_named_at_report_time(returned, message):
    def metrics(p, h, b):
        return returned if trained(p) else {"loss": float(mse(p, h, b))}

    task = spec(metrics=metrics).build()
    with pytest.raises(hd.HyperdiffError, match=f"^{re.escape(message)}$"):
        task.evaluate(seeds=(0,))


def test_metrics_with_other_names_on_another_batch_are_refused():
    def metrics(p, h, b):
        extra = {"acc": 1.0} if len(b[1]) > 5 else {}
        return {"loss": float(mse(p, h, b)), **extra}

    data = hd.given_splits(train=(X[:30], Y[:30]), val=(X[30:45], Y[30:45]),
                           test=[(X[45:55], Y[45:55]), (X[55:], Y[55:])])
    task = spec(data=data, metrics=metrics, probe=False).build(selection_fraction=0)
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "task toy: metrics must return the same names on every batch (got ['acc', 'loss'] "
            "on batch 0, ['loss'] on batch 1 of the test split)")):
        task.evaluate(seeds=(0,))


@pytest.mark.parametrize("returned, message", [
    ({"a": "x"}, "task toy: summarize(values, task_data) must return a dict {label: number}; "
                 "entry 'a' is 'x'"),
    (None, "task toy: summarize(values, task_data)'s result must be a dict {label: number} "
           "(got None)"),
])
def test_summarize_results_are_checked(returned, message):
    task = spec(summarize=lambda values, data: returned).build()
    with pytest.raises(hd.HyperdiffError, match=f"^{re.escape(message)}$"):
        task.summarize(task.hparams.natural())


def test_a_summarize_tensor_becomes_a_float():
    task = spec(summarize=lambda values, data: {"a": values["lam"] * 2}).build()
    summary = task.summarize(task.hparams.natural())
    assert summary == {"a": pytest.approx(0.2)} and type(summary["a"]) is float


BAD_TASK = '''
import torch, hyperdiff as hd
x = torch.linspace(-1, 1, 180, dtype=torch.float64).reshape(60, 3).sin()
y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
mse = lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()
FIXED = {fixed}

def metrics(p, h, b):
    if FIXED or not bool(p["w"].abs().sum() > 0):
        return {{"loss": float(mse(p, h, b))}}
    return {{"loss": "x"}}

def build(steps=3, data_seed=0):
    return hd.task("bad", model={{"w": torch.zeros(3, dtype=torch.float64)}},
                   train_loss=lambda p, h, b: mse(p, h, b) + h["lam"] * p["w"].square().sum(),
                   val_loss=mse, hparams=hd.HyperParameters(lam=hd.scalar(0.1)),
                   optimizer=hd.sgd(0.05), data=(x, y), steps=steps, metrics=metrics)
'''


def test_a_failing_report_keeps_the_run_which_resumes_once_the_task_is_fixed(tmp_path, caplog):
    task_file, out = tmp_path / "bad_task.py", tmp_path / "run"
    task_file.write_text(BAD_TASK.format(fixed=False))
    forget_specs()
    args = ["run", "--task", f"{task_file}:build", "--set", "stop.max_steps=2", "--set",
            "report.seeds=1", "--set", "output.checkpoint_seconds=0", "--quiet"]
    assert main([*args, "--out", str(out)]) == 2
    assert "task bad: metrics must return a dict {name: number}; entry 'loss' is 'x' on batch " \
           "0 of the train split" in caplog.text
    assert (f"the run's 2 outer steps are saved in {out}: fix the task, then `hyperdiff run "
            f"--resume {out} --accept-changed-inputs` writes the report") in caplog.text
    assert not (out / "result.json").exists()
    assert len((out / "history.jsonl").read_text().splitlines()) == 2  # the steps are kept
    task_file.write_text(BAD_TASK.format(fixed=True))  # a fresh process imports the fixed file
    done = subprocess.run([sys.executable, "-m", "hyperdiff", "run", "--resume", str(out),
                           "--accept-changed-inputs", "--quiet"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "finished" and result["steps"] == 2


# --- 6. hd.task's arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"test_fraction": "0.2"}, "task toy: test_fraction must be a finite number in (0, 1) "
                               "(got '0.2')"),
    ({"val_fraction": None}, "task toy: val_fraction must be a finite number in (0, 1) "
                             "(got None)"),
    ({"search_space": [("lam", 1)]}, "task toy: search_space must be a dict {hyperparameter "
                                     "name: hd.tasks.SearchRange(low, high) or SearchChoices} "
                                     "or None (got [('lam', 1)])"),
    ({"cross_validation": 1}, "task toy: cross_validation must be True, False, or a string "
                              "saying why task.cv_folds is refused (got 1)"),
    ({"task_type": dict}, "task toy: task_type must be hd.tasks.Task or a subclass of it "
                          "(got <class 'dict'>)"),
    ({"probe": "no"}, "task toy: probe must be True or False (got 'no')"),
    ({"prepare": "standardize"}, "task toy: prepare must be a function or None "
                                 "(got 'standardize')"),
])
def test_task_arguments_of_the_wrong_kind_are_refused_by_name(kw, message):
    with pytest.raises(hd.HyperdiffError, match=f"^{re.escape(message)}$"):
        spec(**kw)


@pytest.mark.parametrize("prepare, got", [
    (lambda data, rows: None, "None"),
    (lambda data, rows: (data[0][:10], data[1][:10]), "10 rows"),
])
def test_prepare_must_keep_every_row(prepare, got):
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "toy: prepare(data, splits) must return the data as a tensor, a tuple or a dict of "
            f"tensors with all its 60 rows, which the splits index (got {got})")):
        spec(prepare=prepare).build()


# --- 7. data_seed at the top of its range -------------------------------------------------------

def sklearn_splits(n, seed, n_test, n_val, n_sel):
    """The documented cuts, straight from scikit-learn (the reference)."""
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(np.arange(n), test_size=n_test, random_state=seed)
    train, val = train_test_split(rest, test_size=n_val, random_state=(seed + 1) % 2**32)
    val, sel = train_test_split(val, test_size=n_sel, random_state=(seed + 2) % 2**32)
    return [sorted(rows.tolist()) for rows in (train, val, sel, test)]


@pytest.mark.parametrize("seed", [0, 5, 2**32 - 3, 2**32 - 2, 2**32 - 1])
def test_splits_follow_the_documented_seeds_up_to_the_top_of_the_range(seed):
    s = split_rows(100, test=0.25, val=0.2, selection_fraction=0.5, seed=seed)
    got = [s.train.tolist(), s.val.tolist(), s.selection.tolist(), s.test.tolist()]
    assert got == sklearn_splits(100, seed, 25, 20, 10)


def test_a_data_seed_past_the_range_is_refused_by_build_and_build_task():
    message = "data_seed must be an int in [0, 4294967295] (got 4294967296)"
    with pytest.raises(hd.HyperdiffError, match=f"^task toy: {re.escape(message)}$"):
        spec().build(data_seed=2**32)
    with pytest.raises(hd.HyperdiffError, match=f"^task ridge_diabetes: {re.escape(message)}$"):
        build_task("ridge_diabetes", steps=2, data_seed=2**32)
    given = hd.given_splits(train=(X[:30], Y[:30]), val=(X[30:45], Y[30:45]),
                            test=(X[45:], Y[45:]))
    assert spec(data=given).build(data_seed=2**32 - 1).info["sizes"]["selection"] == 8


# --- 8. split messages -------------------------------------------------------------------------

def test_stratified_float_targets_are_called_float_without_the_class_list():
    with pytest.raises(hd.HyperdiffError) as info:
        spec(stratify=True).build()
    message = str(info.value)
    assert "stratify=False) if the 60 distinct float targets are not classes" in message
    assert "Classes with too few members" not in message


def test_fractions_that_leave_no_training_rows_are_named():
    with pytest.raises(hd.HyperdiffError, match=re.escape(
            "task toy: test_fraction + val_fraction must be below 1, leaving rows to train on "
            "(got 0.6 + 0.5 = 1.1)")):
        spec(test_fraction=0.6, val_fraction=0.5)


# --- 9. non-finite losses ----------------------------------------------------------------------

def test_a_non_finite_loss_at_the_initial_parameters_is_refused_when_probed():
    nan = lambda p, h, b: {"loss": float("nan")}  # noqa: E731
    with pytest.raises(hd.HyperdiffError, match=r"^task toy: metrics must return a finite "
                       r"'loss' at the initial parameters \(got nan on the train split; its "
                       r"batch: batch\[0\] \(33, 3\) float64"):
        spec(metrics=nan).build()
    spec(metrics=nan, probe=False).build()  # not probed: not refused


def test_a_non_finite_initial_loss_does_not_blame_the_tuned_values():
    nan = {"selection": {"loss": math.nan}}
    warning = diverged_retraining(nan, nan, 1e6)
    assert warning is not None and "tuned values diverge" not in warning
    assert warning.startswith("the initial values' selection loss is nan when trained fresh "
                              "on the report seeds (tuned values: nan), so the tuned values "
                              "cannot be judged against it")
    assert diverged_retraining({"val": {"loss": 0.5}}, {"val": {"loss": math.inf}},
                               1e6).startswith("the tuned values diverge")


# --- 10. arch_digits variants are their own tasks -----------------------------------------------

@pytest.mark.parametrize("name", ["arch_digits_gumbel", "arch_digits_reinforce", "arch_digits"])
def test_arch_digits_variants_record_their_own_name(name):
    assert build_task(name, steps=2).name == name


# --- 11. docs ----------------------------------------------------------------------------------

def test_the_docs_table_of_built_in_tasks_lists_every_task():
    text = (Path(__file__).parents[1] / "docs" / "driver.md").read_text()
    section = text.split("## Built-in tasks", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(\w+)`", section, flags=re.M)
    assert listed == list(TASKS)
    assert "All on data that ships with scikit-learn" not in section


# --- the table of a summary key one side lacks -------------------------------------------------

def test_a_summary_key_only_one_side_has_is_shown_as_a_dash():
    metrics = {"test": {"loss": 1.0}}
    side = {"hparams": {"lam": 0.1}, "metrics": metrics}
    table = format_table({
        "task": "toy", "steps": 1, "time_s": 0.0, "stop_reason": "x", "best_step": 0,
        "criterion": "selection_loss", "sizes": {}, "report_seeds": [0], "run_dir": "r",
        "initial": {**side, "summary": {"a": 1.0}},
        "tuned": {**side, "summary": {"a": 2.0, "b": 3.0}}})
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()
            if re.match(r"  \w", line)}
    assert rows == {"a": ["1", "2"], "b": ["-", "3"]}
