"""A user's own task (tests/user_task_example.py) through the whole CLI, loaded as a module and
as a file; BatchNorm metrics in eval mode; the CSV logger; bad task references."""

from __future__ import annotations

import copy
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import user_task_example

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.tasks import build_task

HERE = Path(__file__).parent
FILE_REF = f"{HERE / 'user_task_example.py'}:build"
MODULE_REF = "user_task_example:build"
QUICK = ["--set", "report.seeds=1", "--quiet"]


def history(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "history.jsonl").read_text().splitlines()]


def without_times(records):
    return [{k: v for k, v in r.items() if k not in ("time_s", "step_time_s")} for r in records]


@pytest.mark.parametrize("ref", [MODULE_REF, FILE_REF], ids=["module", "file"])
def test_a_user_task_runs_resumes_and_plots(tmp_path, capsys, ref):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", "--task", ref, *QUICK, "--out", str(full)]) == 0
    table = capsys.readouterr().out
    for text in ("user_bn", "lr (6 values)", "wd", "selection loss", "test accuracy"):
        assert text in table
    assert len(history(full)) == 3  # the task's own defaults: stop.max_steps = 3

    class Interrupt:  # the public callback hook stops the run after its second step
        def __call__(self, opt, record):
            if record.step == 1:
                raise KeyboardInterrupt

    config = load_config(overrides=[f"task.name={ref}", "report.seeds=1"])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out=cut, progress=False, log=lambda m: None,
                       callbacks=[Interrupt()])
    assert len(history(cut)) == 2
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0
    assert without_times(history(cut)) == without_times(history(full))
    assert json.loads((cut / "result.json").read_text())["tuned"]["metrics"] == json.loads(
        (full / "result.json").read_text())["tuned"]["metrics"]
    capsys.readouterr()
    assert main(["plot", str(cut)]) == 0
    assert len(capsys.readouterr().out.split()) == 4


def test_a_user_task_goes_through_check_and_compare(tmp_path, capsys):
    assert main(["check", FILE_REF, "--steps", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reverse" in out and "finite_difference" in out
    assert main(["compare", "--task", MODULE_REF, "--no-tpe", "--budget", "2", *QUICK,
                 "--out", str(tmp_path)]) == 0
    assert "random" in capsys.readouterr().out
    assert json.loads((tmp_path / "comparison.json").read_text())["task"] == "user_bn"


def test_batchnorm_metrics_use_the_running_statistics():
    """Oracle: the trained params and running statistics loaded into the torch module,
    evaluated with module.eval() by plain torch."""
    task = build_task(MODULE_REF, steps=6)
    seed = 11
    report = task.evaluate(seeds=(seed,))
    state, _ = hd.testing.train(replace(task.final_problem, seed=seed))
    module = copy.deepcopy(user_task_example.make_net(0))
    module.load_state_dict({**state.params, **state.buffers}, strict=False)
    module.eval()
    x, y = task.splits["test"][0]
    with torch.no_grad():
        logits = module(x)
        batch_logits = module.train()(x)  # batch statistics: what eval mode must not use
    expected = float(F.cross_entropy(logits, y))
    assert report["test"]["loss"] == pytest.approx(expected, rel=1e-12)
    assert report["test"]["accuracy"] == pytest.approx(
        float((logits.argmax(-1) == y).double().mean()))
    assert abs(float(F.cross_entropy(batch_logits, y)) - expected) > 1e-3
    assert set(state.buffers) == {"1.running_mean", "1.running_var"}


def test_the_csv_logger_rows_equal_the_history(tmp_path):
    config = load_config(overrides=[f"task.name={MODULE_REF}", "report.seeds=1",
                                    "log.csv=steps.csv"])
    seen = []
    run_experiment(config, out=tmp_path, progress=False, log=lambda m: None,
                   callbacks=[lambda opt, record: seen.append(record)])
    records = hd.history.History([hd.history.StepRecord.from_json(json.dumps(r)) for r in history(tmp_path)])
    assert [r.step for r in seen] == [r.step for r in records]
    with open(tmp_path / "steps.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records) == 3
    for row, record in zip(rows, records, strict=True):
        for key in ("train_loss", "val_loss", "selection_loss", "grad_norm", "lr", "time_s"):
            assert float(row[key]) == getattr(record, key)
        assert int(row["step"]) == record.step and row["status"] == record.status
        assert float(row["hparams/wd"]) == record.hparams["wd"]
        lr = record.hparams["lr"]
        assert float(row["hparams/lr/mean"]) == sum(lr) / len(lr)
        assert float(row["hparams/lr/max"]) == max(lr)


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    config = load_config(overrides=[f"task.name={MODULE_REF}", "report.seeds=1",
                                    "stop.max_steps=2", "log.tensorboard=tb"])
    run_experiment(config, out=tmp_path, progress=False, log=lambda m: None)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    records = history(tmp_path)
    for tag, key in (("loss/val", "val_loss"), ("outer/grad_norm", "grad_norm"),
                     ("outer/lr", "lr")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [r["step"] for r in records]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert [e.value for e in events.Scalars("hparam/wd")] == pytest.approx(
        [r["hparams"]["wd"] for r in records], rel=1e-6)


def test_tensorboard_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    config = load_config(overrides=[f"task.name={MODULE_REF}", "log.tensorboard=tb"])
    with pytest.raises(hd.HyperdiffError, match=r"hyperdiff\[tensorboard\]"):
        run_experiment(config, out=tmp_path / "run", progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("no_such_module_xyz:build", "module 'no_such_module_xyz'"),
     ("missing/file.py:build", "file 'missing/file.py'"),
     ("user_task_example:nope", "must define 'nope'"),
     ("user_task_example:NOT_A_FACTORY", "must be a task factory"),
     ("user_task_example:raises", "RuntimeError: the data server is down"),
     ("user_task_example:returns_a_dict", "must return hd.task(...) (got dict)"),
     ("user_task_example:", "'package.module:factory'"),
     ("ridge_diabets", "did you mean ridge_diabetes?"),
     ("examples/own_task.py", "did you mean 'examples/own_task.py:build'")],
)
def test_bad_task_references_give_one_clear_error(tmp_path, capsys, ref, expected):
    assert main(["run", "--task", ref, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_given_splits_with_a_separate_selection():
    x, y = user_task_example.data()
    spec = user_task_example.build()
    given = hd.given_splits(train=(x[:90], y[:90]), val=(x[90:120], y[90:120]),
                            test=(x[120:], y[120:]))
    task = replace(spec, data=given).build(selection_fraction=0.5)
    assert {k: sum(len(b[1]) for b in v) for k, v in task.splits.items()} == {
        "val": 15, "selection": 15, "test": 30}
    with pytest.raises(hd.HyperdiffError, match="cv_folds must be 0 with given_splits"):
        replace(spec, data=given).build(cv_folds=3)


def test_given_splits_selection_may_be_a_dataset_beside_in_memory_val():
    from torch.utils.data import TensorDataset

    x, y = user_task_example.data()
    spec = user_task_example.build()
    given = hd.given_splits(train=(x[:90], y[:90]), val=(x[90:120], y[90:120]),
                            test=(x[120:], y[120:]), selection=TensorDataset(x[:20], y[:20]))
    task = replace(spec, data=given).build(selection_fraction=0.5)
    selection = task.splits["selection"]
    assert isinstance(selection, list) and len(selection) == 1
    assert torch.equal(selection[0][0], x[:20]) and torch.equal(selection[0][1], y[:20])
    assert task.info["sizes"] == {"val": 30, "selection": 20, "test": 30}


def test_a_toml_config_names_a_user_task_and_gets_its_defaults(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'[task]\nname = "{FILE_REF}"\n\n[outer]\nlr = 0.05\n')
    config = load_config(path)
    assert config.task.name == FILE_REF
    assert (config.inner.steps, config.stop.max_steps, config.outer.lr) == (6, 3, 0.05)
    assert load_config(data=config.to_dict()) == config  # what a run directory stores


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"model": torch.nn.Linear(4, 3)}, "model must be hd.functional(module)"),
     ({"data": "abc"}, "data must be a tensor, a tuple or a dict of tensors"),
     ({"data": (torch.zeros(10, 4), torch.zeros(9))}, "must share their first dimension"),
     ({"hparams": lambda data: {"lr": 0.1}}, "hparams must be a hd.HyperParameters"),
     ({"test_fraction": 1.5}, "test_fraction must be in (0, 1)"),
     ({"cross_validation": "folds would leak"}, "cv_folds must be 0 (got 3): folds would leak")],
)
def test_bad_task_descriptions_name_the_argument(change, expected):
    spec = replace(user_task_example.build(), **change)
    with pytest.raises(hd.HyperdiffError) as info:
        spec.build(cv_folds=3 if "cross_validation" in change else 0)
    assert expected in str(info.value)


def test_hd_task_checks_its_arguments():
    spec = user_task_example.build()
    with pytest.raises(hd.HyperdiffError, match="optimizer must be made by hd.sgd"):
        hd.task("x", model=spec.model, train_loss=spec.train_loss, val_loss=spec.val_loss,
                hparams=spec.hparams, optimizer=torch.optim.SGD, data=spec.data, steps=5)
    with pytest.raises(hd.HyperdiffError, match="steps must be a positive int"):
        hd.task("x", model=spec.model, train_loss=spec.train_loss, val_loss=spec.val_loss,
                hparams=spec.hparams, optimizer=spec.optimizer, data=spec.data, steps=0)


def test_the_example_cnn_task_builds_and_evaluates_in_eval_mode():
    root = HERE.parent
    task = build_task(f"{root / 'examples' / 'own_task.py'}:build", steps=2)
    assert task.name == "cnn_digits" and task.hparams["lr"].shape == (2,)
    assert sum(task.info["sizes"].values()) == 1797
    report = task.evaluate(seeds=(0,))
    assert 0.0 <= report["test"]["accuracy"] <= 1.0


def test_a_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    """As `python -m` (and uvicorn) do: a console script has no working directory on
    sys.path, so the loader adds it for a module reference."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    source = (HERE / "user_task_example.py").read_text()
    (tmp_path / "cwd_task_xyz.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    task = build_task("cwd_task_xyz:build", steps=3)
    assert task.name == "user_bn"
    monkeypatch.delitem(sys.modules, "cwd_task_xyz")
