"""Task params (issue 22, item 1): ``[task.params]`` and ``--set task.params.NAME=VALUE`` reach
the task's factory as keyword arguments, checked against its signature; they are stored in
config.toml, fingerprinted, honoured by resume, ``hyperdiff check``, ``hyperdiff compare`` and
``hd.tuned_hparams``. The task (tests/params_task_example.py) has one penalty per feature, so
its number of hyperparameters is ``width``: a run that lost its params could not resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import params_task_example
import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.rundir import RunDir
from hyperdiff.app.tasks import build_task
from hyperdiff.app.tasks.inputs import input_changes
from hyperdiff.app.tasks.loader import forget_specs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REF = "params_task_example:build"
CALLS = params_task_example.CALLS
QUICK = ["--set", "report.seeds=1", "--quiet"]


@pytest.fixture(autouse=True)
def fresh_factory_calls():
    """Each test sees its own factory calls (the spec cache would skip them)."""
    forget_specs()
    CALLS.clear()
    yield
    forget_specs()


def history(run_dir: Path) -> list[dict]:
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "step_time_s")}
            for line in lines]


def test_params_from_toml_and_set_reach_the_factory_typed_as_toml_gives_them(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[task]\nname = "{REF}"\n\n[task.params]\nwidth = 5\nnoise = 0.5\n')
    config = load_config(path, ["task.params.start=0.25"])
    assert config.task.params == {"width": 5, "noise": 0.5, "start": 0.25}
    assert type(config.task.params["width"]) is int
    task = build_task(REF, steps=4, data_seed=2, params=config.task.params)
    assert CALLS[-1] == {"steps": 4, "data_seed": 2, "width": 5, "noise": 0.5, "start": 0.25}
    assert task.hparams["lam"].shape == (5,) and task.info["params"] == config.task.params
    assert torch.equal(task.hparams.natural()["lam"], torch.full((5,), 0.25, dtype=torch.float64))
    # config.toml holds them (an inline table) and reads back to the same config
    stored = tomllib.loads(config.to_toml())
    assert stored["task"]["params"] == config.task.params
    assert load_config(data=stored) == config


def test_a_factory_with_kwargs_takes_any_param_and_a_builtin_takes_hidden():
    config = load_config(overrides=["task.name=params_task_example:build_any",
                                    "task.params.width=2"])
    build_task(config.task.name, steps=3, params=config.task.params)
    assert CALLS[-1]["width"] == 2
    default = build_task("mlp_digits", steps=2)
    same = build_task("mlp_digits", steps=2, params={"hidden": 32})
    wide = build_task("mlp_digits", steps=2, params={"hidden": 8})
    assert default.final_problem.params["W1"].shape == (64, 32)  # the default is unchanged
    assert all(torch.equal(same.final_problem.params[k], v)
               for k, v in default.final_problem.params.items())
    assert wide.final_problem.params["W1"].shape == (64, 8)
    assert wide.final_problem.params["W2"].shape == (8, 10)


@pytest.mark.parametrize(("overrides", "message"), [
    ([f"task.name={REF}", "task.params.widht=4"],
     "config: unknown key task.params.widht; task 'params_task_example:build' (its factory) "
     "accepts the params width, noise, start (did you mean task.params.width?)"),
    ([f"task.name={REF}", "task.width=4"],
     "config: unknown key task.width; [task] accepts name, selection_fraction, cv_folds, "
     "data_seed, params (did you mean task.params.width?)"),
    ([f"task.name={REF}", "task.params.width=four"],
     "config: task.params.width must be of type int (got 'four')"),
    ([f"task.name={REF}", "task.params.steps=4"],
     "config: task.params.steps must not be given; hyperdiff passes steps to the factory from "
     "inner.steps (set that instead)"),
    ([f"task.name={REF}", "task.params.data_seed=4"], "from task.data_seed"),
    ([f"task.name={REF}", "task.params=4"],
     "config: task.params must be a table of the task factory's keyword arguments (got 4)"),
    (["task.name=params_task_example:build_required"],
     "config: task.params.width must be given; task 'params_task_example:build_required' (its "
     "factory) takes it without a default"),
    (["task.name=params_task_example:build_any", "task.params.when=1979-05-27"],
     "config: task.params.when must be a string, number, boolean, array or table (got"),
    (["task.name=ridge_diabetes", "task.params.width=4"],
     "config: unknown key task.params.width; task 'ridge_diabetes' accepts the params none"),
    (["task.name=mlp_digits", "task.params.hiden=4"], "(did you mean task.params.hidden?)"),
])
def test_params_the_factory_does_not_take_are_refused_naming_what_it_takes(overrides, message):
    with pytest.raises(hd.HyperdiffError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)
    if "task.params" in overrides[-1]:
        assert not CALLS  # refused before the factory ran


def test_build_task_checks_params_as_the_config_does():
    with pytest.raises(hd.HyperdiffError, match=r"task params_task_example:build: unknown key "
                       r"params\.widht; .* \(did you mean params\.width\?\)"):
        build_task(REF, params={"widht": 4})


def test_params_change_the_fingerprint():
    old = {"task": {"kind": "module", "reference": REF, "path": "/x.py", "sha256": "a",
                    "params": {"width": 4}}}
    new = {"task": {**old["task"], "params": {"width": 5}}}
    assert input_changes(old, new) == [
        "the task's params: {'width': 4} at the start, {'width': 5} now"]
    unparametrized = {"task": {k: v for k, v in old["task"].items() if k != "params"}}
    assert input_changes(unparametrized, unparametrized) == []
    assert input_changes(unparametrized, old) != []


def test_params_survive_resume_and_export_and_a_changed_param_is_refused(tmp_path, capsys):
    """Oracle: an interrupted, resumed run gives the history of an uninterrupted one."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--task", REF, "--set", "task.params.width=4", "--set", "task.params.start=0.2"]
    assert main(["run", *args, *QUICK, "--out", str(full)]) == 0

    def interrupt(opt, record):
        if record.step == 1:
            raise KeyboardInterrupt

    config = load_config(overrides=[f"task.name={REF}", "task.params.width=4",
                                    "task.params.start=0.2", "report.seeds=1"])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out=cut, progress=False, log=lambda m: None,
                       callbacks=[interrupt])
    assert len(history(cut)) == 2
    forget_specs()
    CALLS.clear()
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0
    assert CALLS and all(c["width"] == 4 and c["start"] == 0.2 for c in CALLS)
    assert history(cut) == history(full) and len(history(cut)) == 3
    assert len(history(cut)[-1]["hparams"]["lam"]) == 4
    result = json.loads((cut / "result.json").read_text())
    assert result["task_params"] == {"width": 4, "start": 0.2}
    assert tomllib.loads((cut / "config.toml").read_text())["task"]["params"] == {
        "width": 4, "start": 0.2}
    assert RunDir(cut).recorded_inputs()["task"]["params"] == {"width": 4, "start": 0.2}

    capsys.readouterr()
    assert main(["run", "--resume", str(cut), "--set", "task.params.width=5"]) == 2
    assert "task.params: {'width': 4, 'start': 0.2} there, {'width': 5, 'start': 0.2} now" in (
        capsys.readouterr().err)

    task = build_task(REF, params={"width": 4, "start": 0.2})
    tuned = hd.tuned_hparams(task, cut).natural()["lam"]
    assert tuned.tolist() == result["tuned"]["hparams"]["lam"]
    with pytest.raises(hd.HyperdiffError, match=r"tuned_hparams: source must be a run of task "
                       r"'ridge_params' with the task's params \{'width': 4\} "
                       r"\(got .*result.json, a run with the params \{'width': 4, 'start': 0.2\}"):
        hd.tuned_hparams(build_task(REF, params={"width": 4}), cut)


def test_check_and_compare_build_the_task_with_its_params(tmp_path, capsys):
    assert main(["check", REF, "--steps", "3", "--set", "task.params.width=2", "--quiet"]) == 0
    assert CALLS and all(c["width"] == 2 for c in CALLS)
    assert "reverse" in capsys.readouterr().out
    assert main(["check", REF, "--set", "task.params.widht=2"]) == 2
    assert "did you mean task.params.width?" in capsys.readouterr().err
    assert main(["check", REF, "--set", "outer.lr=2"]) == 2
    assert "check: --set must set a [task] key" in capsys.readouterr().err

    forget_specs()
    CALLS.clear()
    out = tmp_path / "cmp"
    assert main(["compare", "--task", REF, "--set", "task.params.width=2", "--no-tpe",
                 "--budget", "2", *QUICK, "--out", str(out)]) == 0
    assert CALLS and all(c["width"] == 2 for c in CALLS)
    report = json.loads((out / "comparison.json").read_text())
    assert report["task_params"] == {"width": 2} and report["hparams"] == 2
    for row in report["methods"]:
        assert all(len(t["values"]["lam"]) == 2 for t in row["trials"])
    task = build_task(REF, params={"width": 2})
    assert hd.tuned_hparams(task, out, method="random").natural()["lam"].tolist() == (
        report["methods"][1]["best"]["values"]["lam"])


def test_params_come_only_from_the_config_not_from_the_tasks_defaults():
    """A task's ``defaults`` are read by calling its factory, so they cannot choose the params
    it was called with: ``task.params.*`` there is ignored, not stored unchecked."""
    config = load_config(overrides=["task.name=params_task_example:build_recommending_a_param"])
    assert config.task.params == {} and CALLS[-1]["width"] == 3


def test_hyperdiff_tasks_lists_the_params_each_factory_takes(capsys):
    """The params a built-in factory accepts (besides steps and data_seed), with the defaults
    read from its own signature."""
    import inspect

    from hyperdiff.app.tasks import task_module

    assert main(["tasks"]) == 0
    lines, task = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line and not line.startswith(" "):
            task = line.split()[0]
        elif line.strip().startswith("params:"):
            lines[task] = line.strip()
    hidden = inspect.signature(task_module("mlp_digits").build).parameters["hidden"].default
    assert lines["mlp_digits"].startswith(f"params: hidden={hidden}")
    assert "shots=" in lines["sinusoid_maml"] and "meta_sgd=False" in lines["sinusoid_maml"]
    assert "ridge_diabetes" not in lines  # its factory takes no params
