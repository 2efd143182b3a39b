"""``hyperdiff plot`` and ``hyperdiff compare`` on inputs a user can give them: a run whose
every step failed, an edited history line, ``--budget 0`` and an ``--out`` that already holds a
comparison. Each is drawn, or refused in one line, by the CLI itself (no traceback)."""

from __future__ import annotations

import json
import shutil

import pytest

from hyperdiff.app.cli import main
from hyperdiff.app.cli.compare import OUTPUTS
from hyperdiff.app.plots import FIGURE_NAMES, hparams_figure
from hyperdiff.app.rundir import FIGURES, HISTORY, RunDir
from hyperdiff.tuner.history import History

TINY = ["--set", "inner.steps=5", "--set", "stop.max_steps=3", "--set", "report.seeds=1",
        "--quiet"]

NAN_TASK = '''
import torch
import hyperdiff as hd


def build(steps: int = 5):
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x.sum(1)

    def val(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    def train(p, h, b):  # a user's bug: the training loss is NaN, so every step fails
        return val(p, h, b) * float("nan") + h["lam"] * (p["w"] ** 2).sum()

    return hd.task("nan_task", model={"w": torch.zeros(3, dtype=torch.float64)},
                   train_loss=train, val_loss=val,
                   hparams=hd.HyperParameters(lam=hd.scalar(0.01)), optimizer=hd.sgd(0.1),
                   data=(x, y), steps=steps, batch_size=None)
'''


@pytest.fixture(scope="module")
def ridge_run(tmp_path_factory):
    """A finished three-step run of ``ridge_diabetes`` (copied by each test that edits it)."""
    out = tmp_path_factory.mktemp("ridge") / "run"
    assert main(["run", "--task", "ridge_diabetes", *TINY, "--out", str(out)]) == 0
    return out


def test_plot_draws_a_run_whose_every_step_failed(tmp_path, capsys):
    (tmp_path / "nan_task.py").write_text(NAN_TASK)
    run_dir = tmp_path / "run"
    status = main(["run", "--task", f"{tmp_path / 'nan_task.py'}:build", *TINY,
                   "--out", str(run_dir)])
    records = RunDir(run_dir).read_history()
    assert status == 1 and records and all(r.status == "failed" for r in records)
    capsys.readouterr()
    assert main(["plot", str(run_dir)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(run_dir / FIGURES / name) for name in FIGURE_NAMES]
    panel = hparams_figure(History(records)).axes[0]
    name = next(iter(records[0].hparams))
    assert panel.get_title() == f"{name}: no successful step"
    assert [line.get_color() for line in panel.lines].count("red") == len(records)


@pytest.mark.parametrize(("field", "edit", "problem"), [
    ("hparams", {"lam": "x"}, "must give 'lam' a number or null (got 'x')"),
    ("hparams", {}, "must name ['lam'] (got [])"),
    ("hparams", {"lam": [0.1, 0.2]}, "must give 'lam' a number or null (got [0.1, 0.2])"),
    ("grad", {"lam": None, "mu": 1.0}, "must name ['lam'] (got ['lam', 'mu'])"),
])
def test_plot_names_the_file_and_line_of_an_edited_history_value(ridge_run, tmp_path, capsys,
                                                                 field, edit, problem):
    run_dir = tmp_path / "run"
    shutil.copytree(ridge_run, run_dir)
    history = run_dir / HISTORY
    lines = history.read_text().splitlines()
    record = json.loads(lines[1])
    record[field] = edit
    lines[1] = json.dumps(record)
    history.write_text("\n".join(lines) + "\n")
    assert main(["plot", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{history} line 2 is not a step record: field {field!r} {problem}; " in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (run_dir / FIGURES).exists()


def test_plot_accepts_the_untouched_history(ridge_run, tmp_path, capsys):
    """The control of the test above: the same copy, not edited, is drawn."""
    run_dir = tmp_path / "run"
    shutil.copytree(ridge_run, run_dir)
    assert main(["plot", str(run_dir)]) == 0
    assert all((run_dir / FIGURES / name).is_file() for name in FIGURE_NAMES)


@pytest.mark.parametrize("budget", ["0", "-1"])
def test_compare_refuses_a_budget_that_is_not_positive(tmp_path, capsys, budget):
    out = tmp_path / "cmp"
    status = main(["compare", "--task", "ridge_diabetes", *TINY, "--no-tpe", "--budget", budget,
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert f"compare: --budget must be a positive int (got {budget})" in err
    assert not out.exists()  # refused before any tuning


def test_a_second_compare_into_the_same_out_keeps_the_first(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a directory without a comparison is fine
    args = ["compare", "--task", "ridge_diabetes", *TINY, "--no-tpe", "--budget", "1",
            "--out", str(out)]
    assert main(args) == 0
    first = {name: (out / name).read_bytes() for name in OUTPUTS}
    capsys.readouterr()
    assert main([*args, "--set", "task.data_seed=1"]) == 2
    err = capsys.readouterr().err
    assert (f"compare: the output directory {out} already holds a comparison "
            f"({', '.join(OUTPUTS)}); choose another directory with --out") in err
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == first
