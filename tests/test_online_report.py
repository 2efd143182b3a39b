"""The online report shows the model the run trained itself, and says when it ends worse than
the untuned start (it used to be in result.json only, with no warning: an online run whose own
model diverged to a loss 5e4 x the start's finished as if nothing happened)."""

from __future__ import annotations

import math

import pytest

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import diverged_retraining, format_table, run_experiment
from hyperdiff.app.plans import own_model_warning

ONLINE = ["task.name=logistic_cancer", "outer.mode=online", "report.seeds=1"]
WORSE = "the run's own model ends worse than the untuned start"


def quiet(_: str) -> None:
    return None


def run(tmp_path, *overrides: str) -> dict:
    return run_experiment(load_config(overrides=[*ONLINE, *overrides]), out=tmp_path / "run",
                          log=quiet, progress=False)


def row(table: str, label: str) -> list[str]:
    """The cells of the table row that starts with ``label``."""
    line = next(line for line in table.splitlines() if line.startswith(label))
    return line[len(label):].split()


def test_an_online_run_whose_own_model_ends_worse_says_so(tmp_path):
    # outer steps of 10 log units: the penalties jump until the training diverges; the guard
    # sends the failed windows back, and the plain windows after outer.settle diverge again
    result = run(tmp_path, "outer.lr=10")
    own = result["online_model"]["selection"]["loss"]
    start = result["initial"]["metrics"]["selection"]["loss"]
    assert own > 100 * start  # the case this test is about
    [warning] = [w for w in result["warnings"] if w.startswith(WORSE)]
    assert "on the selection split" in warning and f"loss {own:.4g} against {start:.4g}" in warning
    table = format_table(result)
    assert f"warning: {warning}" in table.splitlines()
    assert "run's own model" in table.splitlines()[2]
    assert row(table, "selection loss") == [f"{start:.4f}",
                                            f"{result['tuned']['metrics']['selection']['loss']:.4f}",
                                            f"{own:.4f}"]
    accuracy = result["online_model"]["test"]["accuracy"]
    assert row(table, "test accuracy (held out)")[-1] == f"{accuracy:.4f}"


def test_an_online_run_that_ends_better_has_the_column_and_no_warning(tmp_path):
    result = run(tmp_path)
    own = result["online_model"]["selection"]["loss"]
    assert own < result["initial"]["metrics"]["selection"]["loss"]
    assert not any(w.startswith(WORSE) for w in result["warnings"])
    table = format_table(result)
    assert row(table, "test loss (held out)")[-1] == f"{result['online_model']['test']['loss']:.4f}"
    assert "warning:" not in table


def table_result(**entries) -> dict:
    """The least result that :func:`format_table` prints, with ``entries`` added."""
    side = {"hparams": {"lr": 0.1}, "summary": {}, "metrics": {"test": {"loss": 1.0}}}
    return {"task": "t", "steps": 1, "time_s": 0.0, "stop_reason": "x", "best_step": 0,
            "criterion": "final values", "sizes": {}, "report_seeds": [0], "run_dir": "r",
            "initial": side, "tuned": side, **entries}


def test_an_offline_table_has_no_own_model_column():
    assert "own model" not in format_table(table_result(criterion="selection loss"))


@pytest.mark.parametrize(("own", "initial", "split"), [
    ({"val": {"loss": 0.5}, "selection": {"loss": 0.3}},
     {"val": {"loss": 0.4}, "selection": {"loss": 0.2}}, "selection"),
    ({"val": {"loss": 0.1}, "selection": {"loss": 0.3}},  # better on val, worse held out
     {"val": {"loss": 0.4}, "selection": {"loss": 0.2}}, "selection"),
    ({"val": {"loss": 0.5}}, {"val": {"loss": 0.4}}, "val"),  # no selection split
    ({"val": {"loss": math.nan}}, {"val": {"loss": 0.4}}, "val"),
    ({"val": {"loss": math.inf}}, {"val": {"loss": 0.4}}, "val"),
])
def test_the_warning_compares_the_held_out_split_first(own, initial, split):
    warning = own_model_warning(own, initial)
    assert warning is not None and warning.startswith(WORSE)
    assert f"on the {split} split" in warning


@pytest.mark.parametrize(("own", "initial"), [
    ({"val": {"loss": 0.5}, "selection": {"loss": 0.2}},  # worse on val, not held out
     {"val": {"loss": 0.4}, "selection": {"loss": 0.2}}),
    ({"val": {"loss": 0.3}}, {"val": {"loss": 0.4}}),
])
def test_no_warning_at_or_below_the_start(own, initial):
    assert own_model_warning(own, initial) is None


DIVERGED = "the tuned values diverge when trained fresh on the report seeds"


def test_tuned_values_whose_fresh_trainings_diverge_say_so(tmp_path):
    # with the guard's bound at 1e3 the windows that diverge are sent back, and the run ends at
    # penalties (up to 3.9) at which a training from the start diverges
    result = run(tmp_path, "outer.lr=10", "guard.max_loss_ratio=1000")
    tuned = result["tuned"]["metrics"]["selection"]["loss"]
    start = result["initial"]["metrics"]["selection"]["loss"]
    assert tuned > 1000 * max(start, 1.0)  # the case this test is about
    [warning] = [w for w in result["warnings"] if w.startswith(DIVERGED)]
    assert f"selection loss {tuned:.3g} against {start:.4g}" in warning
    assert f"warning: {warning}" in format_table(result).splitlines()
    assert not any(w.startswith(DIVERGED) for w in run(tmp_path / "b")["warnings"])


@pytest.mark.parametrize(("tuned", "warns"), [
    (2e6 - 1, False), (2e6, False), (2e6 + 1, True),  # the bound: 1e6 x max(|2|, 1)
    (-3e6, True), (math.nan, True), (math.inf, True)])
def test_the_retraining_bound_is_the_guards(tuned, warns):
    initial = {"val": {"loss": 2.0}, "selection": {"loss": 2.0}}
    found = diverged_retraining(initial, {"val": {"loss": 0.1}, "selection": {"loss": tuned}},
                                1e6)
    assert (found is not None) == warns
    assert diverged_retraining(initial, {"val": {"loss": tuned}, "selection": {"loss": 0.1}},
                               1e6) is None  # the held-out split decides
    assert diverged_retraining({"val": {"loss": 0.5}}, {"val": {"loss": tuned}},
                               1e6) is not None  # |0.5| < 1: the bound is 1e6


def test_metrics_without_a_loss_are_not_judged():
    assert diverged_retraining({"val": {"accuracy": 0.5}}, {"val": {"accuracy": 0.1}}, 10) is None


@pytest.mark.parametrize(("seeds", "line"), [
    ([0], "metrics of one fresh training seed"),
    ([0, 1, 2], "metrics averaged over 3 fresh training seeds"),
])
def test_the_table_counts_its_report_seeds_in_words(seeds, line):
    assert f"examples never used while tuning; {line}" in format_table(
        table_result(report_seeds=seeds))


@pytest.mark.parametrize("tie_steps", [0, 1000])
def test_outer_tie_steps_reaches_an_online_run(tmp_path, tie_steps):
    """Until s39 the online builder never passed it: both runs were the same."""
    result = run(tmp_path, "inner.steps=40", f"outer.tie_steps={tie_steps}")
    [vector] = [v for v in result["tuned"]["hparams"].values() if isinstance(v, list)]
    assert (len(set(vector)) == 1) == (tie_steps > 0)
