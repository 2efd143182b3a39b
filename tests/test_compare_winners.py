"""Comparisons that keep their winners (issue 22, item 5): comparison.json holds each method's
best natural values and its trials; ``hd.tuned_hparams(task, comparison, method=...)`` reads
them; the figure is a PNG. Oracle: retraining any trial's recorded values (through the export)
gives the loss the search recorded for it, bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app import search
from hyperdiff.app.cli import main
from hyperdiff.app.tasks import build_task

STEPS = 20
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    tpe = [] if search.optuna_available() else ["--no-tpe"]
    assert main(["compare", "--task", "ridge_diabetes", "--set", f"inner.steps={STEPS}",
                 "--set", "stop.max_steps=3", "--set", "report.seeds=1", "--quiet",
                 "--budget", "4", "--out", str(out), *tpe]) == 0
    return out, json.loads((out / "comparison.json").read_text())


def test_every_trial_and_winner_is_recorded_and_retrains_to_its_recorded_loss(compared):
    out, report = compared
    task = build_task("ridge_diabetes", steps=STEPS)
    for row in report["methods"]:
        trials = row["trials"]
        assert [t["trial"] for t in trials] == list(range(len(trials)))
        assert [t["trainings"] for t in trials] == row["curve"]["trainings"]
        assert [t["time_s"] for t in trials] == row["curve"]["time_s"]
        running = [min(t["objective"] for t in trials[: i + 1]) for i in range(len(trials))]
        assert running == row["curve"]["best"]
        assert all(set(t["values"]) == {"lam"} and t["selection_loss"] > 0 for t in trials)
        if row["method"] == "hyperdiff":
            continue
        assert len(trials) == 4
        best = row["best"]
        assert best["trial"] == min(range(4), key=lambda i: trials[i]["objective"])
        assert best["values"] == trials[best["trial"]]["values"]
        for trial in trials:  # each trial's values, exported, retrain to its recorded losses
            raw = task.hparams.with_natural(lam=trial["values"]["lam"]).raw
            metrics = task.evaluate(raw, seeds=(0,))  # the search trains with seed outer.seed
            assert metrics["val"]["loss"] == trial["val_loss"] == trial["objective"]
            assert metrics["selection"]["loss"] == trial["selection_loss"]
        exported = hd.tuned_hparams(task, out, method=row["method"])
        again = task.evaluate(exported.raw, seeds=(0,))["val"]["loss"]
        assert again == row["best_val_loss"] == trials[best["trial"]]["val_loss"]


def test_hyperdiffs_winner_is_its_best_step_as_its_own_result_writes_it(compared):
    _, report = compared
    row = report["methods"][0]
    assert row["method"] == "hyperdiff" and len(row["trials"]) == 3
    best = row["best"]
    # the step picked by the selection loss, at the values that step evaluated
    picked = min(row["trials"], key=lambda t: (t["selection_loss"], t["trial"]))
    assert best["trial"] == picked["trial"]
    assert best["values"]["lam"] == pytest.approx(picked["values"]["lam"], rel=1e-15)
    task = build_task("ridge_diabetes", steps=STEPS)
    exported = hd.tuned_hparams(task, report, method="hyperdiff")
    assert exported.natural()["lam"].item() == pytest.approx(best["values"]["lam"], rel=1e-15)


def test_the_figure_is_a_png_inside_the_output_directory(compared):
    out, _ = compared
    data = (out / "comparison.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 1000
    assert not (out / "comparison.png").is_symlink()


def test_a_missing_or_unknown_method_is_refused_naming_the_methods(compared, tmp_path):
    out, report = compared
    task = build_task("ridge_diabetes", steps=STEPS)
    names = sorted(r["method"] for r in report["methods"])
    with pytest.raises(hd.HyperdiffError) as err:
        hd.tuned_hparams(task, out, method="rnd")
    assert str(err.value) == (f"tuned_hparams: method must be one of the methods that "
                              f"{out / 'comparison.json'} compared, {names} (got 'rnd') "
                              "(did you mean 'random'?)")
    with pytest.raises(hd.HyperdiffError, match=r"method must be one of the methods that the "
                       r"result compared, \[.*\] \(got None\)"):
        hd.tuned_hparams(task, report)
    old = {**report, "methods": [{k: v for k, v in r.items() if k != "best"}
                                 for r in report["methods"]]}
    with pytest.raises(hd.HyperdiffError, match="written by an older hyperdiff compare"):
        hd.tuned_hparams(task, old, method="random")
    with pytest.raises(hd.HyperdiffError, match="method must be given only with a comparison"):
        hd.tuned_hparams(task, {"task": "ridge_diabetes", "tuned": {"hparams": {"lam": 1.0}}},
                         method="random")
    with pytest.raises(hd.HyperdiffError, match="source must be a run of task 'mlp_digits'"):
        hd.tuned_hparams(build_task("mlp_digits", steps=2), report, method="random")


def test_natural_form_broadcasts_shared_values_and_takes_discrete_choices():
    theta = {"a": torch.zeros(2), "b": torch.zeros(3)}
    hparams = hd.HyperParameters(lr=hd.scalar(0.2), wd=hd.per_tensor(theta, 1.0),
                                 act=hd.categorical(["relu", "tanh", "gelu"]))
    form = search.natural_form(hparams, {"wd": 0.3, "act": "tanh"})
    assert form["wd"] == [0.3, 0.3] and form["lr"] == pytest.approx(0.2, rel=1e-15)
    act = form["act"]
    assert max(range(3), key=lambda i: act[i]) == 1 and math.isclose(sum(act), 1.0)
    back = hparams.with_natural(**{k: torch.tensor(v, dtype=torch.float64)
                                   for k, v in form.items()})
    assert torch.equal(back.natural()["wd"], torch.tensor([0.3, 0.3], dtype=torch.float64))
    assert search.natural_form(hparams, {"wd": [0.1, 0.4]})["wd"] == [0.1, 0.4]


def test_a_failed_phase_keeps_the_finished_phases_winners(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "optuna_available", lambda: True)

    def broken(*args, **kwargs):
        raise RuntimeError("sampler crashed")

    monkeypatch.setattr(search, "tpe_search", broken)
    out = tmp_path / "cmp"
    with pytest.raises(RuntimeError, match="sampler crashed"):
        main(["compare", "--task", "ridge_diabetes", "--set", f"inner.steps={STEPS}",
              "--set", "stop.max_steps=2", "--set", "report.seeds=1", "--quiet",
              "--budget", "2", "--out", str(out)])
    report = json.loads((out / "comparison.json").read_text())
    assert report["failed"]["method"] == "tpe"
    assert [r["method"] for r in report["methods"]] == ["hyperdiff", "random"]
    task = build_task("ridge_diabetes", steps=STEPS)
    random = report["methods"][1]
    assert hd.tuned_hparams(task, out, method="random").natural()["lam"].item() == (
        random["best"]["values"]["lam"])
