"""Options accepted and then ignored, and comparison rows that misreport (s41 fixD): each is
refused now, or reported as what happened.

- ``hyperdiff compare``: a hyperdiff row's trainings and wall time are the whole run's (failed
  last steps too), a black-box method whose every trial diverged has no winner ("no finite
  trial"), absurd losses print in ``.4g``, ``output.dir`` is the default ``--out``, and a CV
  trial's ``val_loss`` is its CV loss;
- ``max_samples`` without ``samples='auto'`` (and online), ``OnlinePlan(eval_every=k)``
  without a selection split, ``outer.seed`` in an online run that draws nothing: refused;
- ``arch_digits``'s ``baseline`` / ``temperature`` that its mode does not read: refused;
- ``finite_difference`` on a Gumbel choice through ``hd.hypergradient``: refused instead of a
  zero hypergradient.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.cli.compare import format_comparison, summarize
from hyperdiff.app.config import load_config
from hyperdiff.app.plans import build_online
from hyperdiff.app.search import SearchResult, Trial, from_history, trial_entry
from hyperdiff.app.tasks import arch_digits
from hyperdiff.engine.problem import takes_context
from hyperdiff.tuner.offline_plan import OfflinePlan

DT = torch.float64
INF = math.inf


def ridge(steps=4, hparams=None, loss_scale=None):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=gen, dtype=DT)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    xv = torch.randn(16, 3, generator=gen, dtype=DT)
    yv = xv @ torch.tensor([1.0, -2.0, 0.5], dtype=DT)

    def val_loss(p, h, b):
        scale = 1.0 if loss_scale is None else loss_scale(h)
        return ((b[0] @ p["w"] - b[1]) ** 2).mean() * scale

    def train_loss(p, h, b):
        penalty = h["lam"] * (p["w"] ** 2).sum() if "lam" in h else 0.0
        return val_loss(p, h, b) + penalty

    hp = hparams or hd.HyperParameters(lam=hd.scalar(0.1))
    kwargs = dict(optimizer=hd.sgd(0.05), train_data=(x, y), val_data=(xv, yv), steps=steps)
    return train_loss, val_loss, hp, {"w": torch.zeros(3, dtype=DT)}, kwargs


def problem(**kw):
    train_loss, val_loss, hp, params, kwargs = ridge(**kw)
    return hd.make_problem(train_loss, val_loss, hp, params, **kwargs)


def trial(number, objective, trainings=None, time_s=None):
    return Trial(number, {"lam": 0.1}, objective, {"val_loss": objective},
                 number + 1 if trainings is None else trainings,
                 float(number + 1) if time_s is None else time_s)


# --- 1: a hyperdiff row counts its failed last steps ----------------------------------------
def test_from_history_counts_the_trainings_and_time_of_failed_last_steps():
    history = hd.HyperOptimizer(problem(), lr=0.1, stopping=hd.Stopping(max_steps=2)).run().history
    ok = history[1]
    failed = [replace(ok, step=2, status="failed", val_loss=None, trainings=3, time_s=7.5),
              replace(ok, step=3, status="failed", val_loss=None, trainings=4, time_s=9.0)]
    result = from_history([*history, *failed])
    assert len(result.trials) == 2  # the failed steps are no trials
    assert (result.trainings, result.time_s) == (4, 9.0)  # the whole run's, as its budget
    curve = result.curve()
    best = min(history[0].val_loss, history[1].val_loss)
    assert curve["trainings"] == [1, 2, 4] and curve["time_s"][-1] == 9.0
    assert curve["best"][-1] == best
    plain = from_history(history)  # no failed step: the curve is the trials'
    assert plain.curve()["trainings"] == [1, 2] and plain.trainings == 2


# --- 2: every trial diverged: no winner, a warning, .4g numbers -----------------------------
def test_a_search_whose_every_trial_diverged_reports_no_finite_trial():
    result = SearchResult("random", (trial(0, INF), trial(1, INF)))
    assert not result.found_finite
    task = SimpleNamespace(hparams=hd.HyperParameters(lam=hd.scalar(0.1)))
    row = summarize(result, {}, task=task)
    assert row["no_finite_trial"] is True and row["best"] is None  # nothing to export
    finite = summarize(SearchResult("random", (trial(0, INF), trial(1, 0.25))),
                       {"test": {"loss": 0.3}}, task=task)
    assert "no_finite_trial" not in finite and finite["best"]["trial"] == 1
    report = {"task": "t", "hparams": 1, "budget": 2, "report_seeds": [1], "cv_folds": 0,
              "methods": [finite, row]}
    text = format_comparison(report)
    line = next(r for r in text.splitlines() if r.startswith("random") and "no finite" in r)
    assert line.split()[3:5] == ["no", "finite"] and line.split()[-2:] == ["-", "-"]
    assert "warning: random: no finite trial" in text
    comparison = {"task": "t", "methods": [{**row, "method": "random"}]}
    with pytest.raises(hd.HyperdiffError, match="every trial of which diverged"):
        hd.tuned_hparams(task.hparams, comparison, method="random")


def test_absurd_losses_print_in_four_significant_digits():
    row = summarize(SearchResult("random", (trial(0, 2.5741e244),)),
                    {"test": {"loss": 3.0551e244, "accuracy": 0.1}})
    report = {"task": "t", "hparams": 1, "budget": 1, "report_seeds": [1], "methods": [row]}
    line = format_comparison(report).splitlines()[3]
    assert line.split() == ["random", "1", "1.0", "2.574e+244", "3.055e+244", "0.1000"]
    assert len(line) < 70


# --- 3: output.dir is compare's default --out -----------------------------------------------
COMPARE = ["compare", "--task", "ridge_diabetes", "--set", "inner.steps=5", "--set",
           "stop.max_steps=1", "--set", "report.seeds=1", "--budget", "1", "--no-tpe", "-q"]


def test_compare_writes_into_output_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*COMPARE, "--set", "output.dir=mine/cmp"]) == 0
    report = json.loads((tmp_path / "mine" / "cmp" / "comparison.json").read_text())
    assert [r["method"] for r in report["methods"]] == ["hyperdiff", "random"]
    assert not (tmp_path / "runs").exists()
    assert "mine/cmp/comparison.png" in capsys.readouterr().out
    assert main([*COMPARE, "--set", "output.dir=mine/cmp"]) != 0  # refused before tuning
    assert ("the output directory mine/cmp already holds a comparison"
            in capsys.readouterr().err)


def test_compare_refuses_an_output_dir_outside_the_working_directory(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path / "..")
    assert main([*COMPARE, "--set", f"output.dir=../{tmp_path.name}-x"]) != 0
    assert ("config: output.dir must be a relative path without '..'"
            in capsys.readouterr().err)
    assert not (tmp_path / f"../../{tmp_path.name}-x").exists()


# --- 4: a CV trial's val_loss is its CV loss --------------------------------------------------
def test_a_cross_validated_trial_records_its_cv_loss_as_val_loss():
    cv = Trial(0, {"lam": 0.1}, 0.375, {"outer_loss": 0.375}, 5, 1.0)
    entry = trial_entry(cv, {"lam": 0.1})
    assert entry["objective"] == entry["val_loss"] == 0.375 and entry["selection_loss"] is None
    held_out = Trial(0, {"lam": 0.1}, 0.5, {"val_loss": 0.5, "selection_loss": 0.25}, 1, 1.0)
    assert (trial_entry(held_out, {})["val_loss"], trial_entry(held_out, {})["selection_loss"]
            ) == (0.5, 0.25)


# --- 7: max_samples with a fixed samples, and online ------------------------------------------
def test_max_samples_is_refused_without_auto_samples():
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: max_samples must be its "
                                                r"default 16 unless samples='auto' .*\(got 3\)$"):
        hd.HyperOptimizer(problem(), samples=2, max_samples=3)
    with pytest.raises(hd.HyperdiffError, match=r"max_samples must be its default 16"):
        OfflinePlan(samples=1, max_samples=4)
    assert OfflinePlan(samples="auto", max_samples=4).auto.maximum == 4
    assert OfflinePlan(samples=2, max_samples=16).samples == 2


def test_online_runs_refuse_max_samples():
    config = load_config(overrides=["task.name=ridge_diabetes", "outer.mode=online",
                                    "outer.max_samples=3"])
    with pytest.raises(hd.HyperdiffError, match=r"^config: outer.max_samples must be left at "
                                                r"its default 16 with outer.mode = 'online'"):
        build_online(config)


# --- 10: OnlinePlan options nothing would read -------------------------------------------------
def test_eval_every_is_refused_without_a_selection_split():
    with pytest.raises(hd.HyperdiffError, match=r"^HyperOptimizer: eval_every must be 0 "
                                                r"without a selection split .*\(got 2\)$"):
        hd.HyperOptimizer(problem(), plan=hd.plans.OnlinePlan(eval_every=2))
    selection = problem().val_data
    loop = hd.HyperOptimizer(problem(), plan=hd.plans.OnlinePlan(eval_every=2),
                             selection=selection)
    assert loop.plan.eval_every == 2


def test_an_online_seed_that_nothing_reads_is_refused_by_the_cli_and_said_by_the_library(
        caplog):
    base = ["task.name=ridge_diabetes", "outer.mode=online", "outer.seed=5"]
    with pytest.raises(hd.HyperdiffError, match=r"^config: outer.seed must be left at its "
                                                r"default 0 with outer.mode = 'online', "
                                                r"outer.val_batch = 0"):
        build_online(load_config(overrides=base))
    _task, loop = build_online(load_config(overrides=[*base, "outer.val_batch=8"]))
    assert loop.seed == 5
    with caplog.at_level(logging.WARNING):
        hd.HyperOptimizer(problem(), plan=hd.plans.OnlinePlan(), seed=3)
    assert "seed=3 is not read" in caplog.text


# --- 11: arch_digits' unread task params -------------------------------------------------------
def test_arch_digits_refuses_the_option_its_mode_does_not_read():
    with pytest.raises(hd.HyperdiffError, match=r"^arch_digits: baseline must be its default "
                                                r"'moving_average' with mode='relax' .*"
                                                r"\(got 'none'\)$"):
        arch_digits.build(steps=2, baseline="none")
    with pytest.raises(hd.HyperdiffError, match=r"^arch_digits: temperature must be its "
                                                r"default \(1.0, 0.3\) with "
                                                r"mode='reinforce' .*\(got 5.0\)$"):
        arch_digits.build(steps=2, mode="reinforce", temperature=5.0)
    # the defaults, given explicitly (benchmarks/discrete.py passes its baseline), build
    assert arch_digits.build(steps=2, mode="gumbel", baseline="moving_average") is not None


# --- 12: finite_difference on a Gumbel choice ---------------------------------------------------
def test_hypergradient_refuses_finite_difference_on_a_gumbel_choice():
    hp = hd.HyperParameters(c=hd.categorical([1.0, 2.0], mode="gumbel"))
    train_loss, val_loss, hp, params, kwargs = ridge(
        hparams=hp, loss_scale=lambda h: hd.choose(h["c"], [1.0, 2.0]))
    message = r"^finite_difference: the Gumbel choices \['c'\]"
    with pytest.raises(hd.HyperdiffError, match=message):
        hd.hypergradient(train_loss, val_loss, hp, params, method=hd.finite_difference(),
                         **kwargs)
    gumbel = hd.make_problem(train_loss, val_loss, hp, params, **kwargs)
    assert hd.reverse()(gumbel).grad["c"].abs().sum() > 0  # the control: reverse moves it


# --- 13: the caller a loss check names -------------------------------------------------------
def test_the_loss_signature_check_names_its_caller():
    with pytest.raises(hd.HyperdiffError, match=r"^make_problem: train_loss must accept "
                                                r"\(params, hparams, batch\)"):
        takes_context(lambda p, h: p, "train_loss", caller="make_problem")
    with pytest.raises(hd.HyperdiffError, match=r"^hypergradient: val_loss must be a callable"):
        takes_context(3, "val_loss")  # type: ignore[arg-type]


# --- s41: an online rescue / retry with no one learning rate to cut ---------------------------
def per_step_lr_problem(steps=6):
    train_loss, val_loss, _, params, kwargs = ridge(steps=steps)
    hp = hd.HyperParameters(lr=hd.per_step(steps, 0.05))
    return hd.make_problem(train_loss, val_loss, hp, params,
                           **{**kwargs, "optimizer": hd.sgd("lr")})


def test_an_online_rescue_or_retry_that_nothing_can_cut_is_said(caplog):
    with caplog.at_level(logging.WARNING):
        hd.HyperOptimizer(per_step_lr_problem(), method="reverse",
                          plan=hd.plans.OnlinePlan(window=2, rescue=3, retry=2)).step()
    assert ("rescue=3 and retry=2 are not applied: they cut or raise one learning rate"
            in caplog.text)
    assert "the per_step hyperparameter 'lr'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # without the options: nothing to say
        hd.HyperOptimizer(per_step_lr_problem(), method="reverse",
                          plan=hd.plans.OnlinePlan(window=2)).step()
        hd.HyperOptimizer(problem(), method="reverse",  # a number lr is not tuned: no word
                          plan=hd.plans.OnlinePlan(window=2, rescue=3, retry=2)).step()
    assert "are not applied" not in caplog.text


def test_the_cli_defaults_of_rescue_and_retry_are_not_said_where_they_cannot_apply(caplog):
    """mlp_digits tunes a per_step lr: at their defaults the two keys are passed as 0 (nothing
    said); set off their defaults they are passed and said (s41 review: every default online
    run of the task warned about settings the user never made)."""
    base = ["task.name=mlp_digits", "outer.mode=online", "inner.steps=12", "outer.window=4"]
    with caplog.at_level(logging.WARNING):
        _task, loop = build_online(load_config(overrides=base))
        loop.step()
    assert "are not applied" not in caplog.text
    with caplog.at_level(logging.WARNING):
        _task, loop = build_online(load_config(overrides=[*base, "outer.rescue=1"]))
        loop.step()
    assert "rescue=1 and retry=2 are not applied" in caplog.text
