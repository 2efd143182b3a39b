"""`hyperdiff run` / `compare` on a task with discrete hyperparameters: the discretised report
and the relaxation gap, cross-validated black-box trials, and an exact resume through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import CHECKPOINT
from hyperdiff.app.tasks import arch_digits, build_task
from hyperdiff.hparams.choices import fixed_hparams
from hyperdiff.seeds import REPORT_SEED

QUICK = ["--set", "inner.steps=4", "--set", "stop.max_steps=3", "--set", "report.seeds=1",
         "--set", "task.selection_fraction=0.5", "--quiet"]


def lines(run_dir: Path) -> list[dict]:
    records = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time_s", "step_time_s")} for r in records]


@pytest.fixture(scope="module")
def arch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "arch"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", "--task", "arch_digits", *QUICK, "--out", str(out)]) == 0
    return out, printed.getvalue()


def test_run_prints_the_chosen_values_and_the_relaxation_gap(arch_run):
    """Oracles: the discretised numbers are Task.evaluate at the best raw values (from the
    checkpoint); the relaxed ones are arch_digits built with a constant temperature equal to
    the best step's, trained with its specs as they are (evaluate_as): the relaxed model."""
    out, table = arch_run
    result = json.loads((out / "result.json").read_text())
    part = result["discrete"]
    best_raw = torch.load(out / CHECKPOINT, weights_only=False)["best"]["raw"]
    seeds = (REPORT_SEED,)

    task = build_task("arch_digits", steps=4, selection_fraction=0.5)
    discretised = task.evaluate(best_raw, seeds=seeds)
    assert part["discretised"] == discretised == result["tuned"]["metrics"]
    chosen = task.hparams.with_raw(best_raw).best()
    assert part["choices"] == chosen

    record = lines(out)[result["best_step"]]
    taus = record["discrete"]["temperature"]
    assert len(set(taus.values())) == 1 and set(taus) == {"depth", "width", "activation"}
    plain_relaxed = arch_digits.build(steps=4, temperature=taus["depth"]).build(
        selection_fraction=0.5)
    relaxed = plain_relaxed.evaluate_as(plain_relaxed.final_problem.hparams, best_raw,
                                        seeds=seeds)
    assert part["relaxed"] == relaxed
    assert relaxed["test"]["loss"] != discretised["test"]["loss"]  # two different models
    for split in ("val", "selection", "test"):
        assert part["gap"][split] == discretised[split]["loss"] - relaxed[split]["loss"]
        assert (f"{relaxed[split]['loss']:<12.4f}{discretised[split]['loss']:<13.4f}"
                f"{part['gap'][split]:+.4f}") in table

    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.strip()}
    for name, choice in chosen.items():  # chosen values, not probability summaries
        assert rows[name][0] == str(task.hparams.best()[name])
        assert rows[name][1] == str(choice)
    assert "(3 values)" not in table and "(4 values)" not in table
    assert ", ".join(f"{n}={c}" for n, c in chosen.items()) in table


def test_reinforce_run_reports_no_relaxed_model(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "--task", "arch_digits_reinforce", *QUICK, "--set", "stop.max_steps=1",
                 "--set", "outer.samples=2", "--out", str(out)]) == 0
    assert "no relaxed model" in capsys.readouterr().out
    part = json.loads((out / "result.json").read_text())["discrete"]
    assert part["relaxed"] is None and part["gap"] is None


def test_cross_validated_compare_trains_the_plain_choices(tmp_path, capsys):
    """Oracle for the CV objective of a black-box trial at choice labels: the mean over the
    folds of the validation loss that reverse mode computes for the plain architecture."""
    task = build_task("arch_digits", steps=3, cv_folds=3)
    values = {"lr": 0.2, "weight_decay": 1e-3, "depth": 2, "width": 32, "activation": "tanh"}
    plain = fixed_hparams(task.hparams, values)
    from dataclasses import replace

    by_method = [hd.reverse()(replace(p, hparams=plain)).value for p in task.problems]
    expected = sum(float(v) for v in by_method) / len(by_method)
    assert task.outer_loss(values) == pytest.approx(expected, rel=1e-6)
    other = {**values, "activation": "relu"}
    assert task.outer_loss(other) != task.outer_loss(values)

    assert main(["compare", "--task", "arch_digits", "--set", "task.cv_folds=3", *QUICK,
                 "--set", "stop.max_steps=1", "--budget", "3", "--no-tpe",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert report["objective"] == "outer_loss"
    assert [m["method"] for m in report["methods"]] == ["hyperdiff", "random"]
    assert "random" in capsys.readouterr().out


def test_cli_resume_of_a_discrete_run_is_exact(tmp_path, capsys):
    """Interrupted after 2 of 3 steps, `hyperdiff run --resume` writes the uninterrupted
    history and result (REINFORCE samples, baselines, probabilities) exactly."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    overrides = ["task.name=arch_digits_reinforce", "inner.steps=4", "stop.max_steps=3",
                 "report.seeds=1", "outer.samples=2", "task.selection_fraction=0.5"]
    args = [f"--set={o}" for o in overrides]
    assert main(["run", *args, "--quiet", "--out", str(full)]) == 0

    class Interrupt:
        def __call__(self, opt, record):
            if record.step == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(overrides=overrides), out=cut, progress=False,
                       log=lambda m: None, callbacks=[Interrupt()])
    assert len(lines(cut)) == 2
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0
    assert lines(cut) == lines(full)
    assert lines(cut)[-1]["discrete"]["samples"]["depth"]
    ours, theirs = (json.loads((d / "result.json").read_text()) for d in (cut, full))
    assert ours["discrete"] == theirs["discrete"]
    assert ours["tuned"] == theirs["tuned"]


def test_a_mode_and_temperature_from_the_cli_through_a_factory_file(tmp_path, capsys):
    """docs/discrete.md's recipe: a two-line factory file picks the mode and its options."""
    factory = tmp_path / "my_arch.py"
    factory.write_text(
        "from hyperdiff.app.tasks import arch_digits\n\n"
        "def build(*, steps=100, data_seed=0):\n"
        "    return arch_digits.build(steps=steps, data_seed=data_seed, mode='gumbel',\n"
        "                             temperature=(2.0, 0.5))\n")
    out = tmp_path / "run"
    assert main(["run", "--task", f"{factory}:build", *QUICK, "--out", str(out)]) == 0
    assert "relaxation gap" in capsys.readouterr().out
    first, last = lines(out)[0], lines(out)[-1]
    assert first["discrete"]["temperature"] == {"depth": 2.0, "width": 2.0, "activation": 2.0}
    assert last["discrete"]["temperature"]["width"] == pytest.approx(0.5)
    task = build_task(f"{factory}:build", steps=4)
    assert {task.hparams[n].mode for n in ("depth", "width", "activation")} == {"gumbel"}
