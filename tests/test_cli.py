"""The command line: subcommands, config errors, the table, figures, the check wiring."""

from __future__ import annotations

import json
import sys
import types
from importlib.metadata import entry_points

import pytest

from hyperdiff.app.cli import COMMANDS, main
from hyperdiff.app.config import load_config
from hyperdiff.app.tasks import TASKS

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--task", "ridge_diabetes", "--set", "inner.steps=40", "--set", "stop.max_steps=4",
         "--set", "report.seeds=1", "--quiet"]



def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_tasks_lists_every_builtin_task(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TASKS)


def test_registry_has_one_module_per_subcommand():
    assert set(COMMANDS) >= {"run", "tasks", "plot", "check"}
    for module in COMMANDS.values():
        assert module.startswith("hyperdiff.app.cli.")


@pytest.mark.parametrize(
    ("toml", "expected"),
    [("[outer]\nlrr = 0.1\n", ["outer.lrr", "did you mean outer.lr?"]),
     ("[outr]\nlr = 0.1\n", ["[outr]", "did you mean [outer]?"]),
     ("[outer]\nlr = \"fast\"\n", ["outer.lr must be a number > 0", "'fast'"]),
     ("[task]\nselection_fraction = 1.5\n", ["task.selection_fraction", "[0, 1)"]),
     ("[outer]\noptimizer = \"adma\"\n", ["outer.optimizer must be one of", "'adam'"]),
     ("[method]\nname = \"forward\"\nchunk = 2\n", ["method.chunk", "chunk_size"]),
     ("[stop]\nmax_steps = 0\n", ["stop.max_steps must be an int >= 1"]),
     ("[task]\ncv_folds = 1\n", ["task.cv_folds must be 0", ">= 2"]),
     ("[outer]\ntie_steps = -2\n", ["outer.tie_steps must be an int >= 0"]),
     ("[outer\nlr = 1\n", ["not valid TOML"])],
)
def test_config_errors_name_the_key_and_the_valid_values(tmp_path, capsys, toml, expected):
    assert main(["run", write(tmp_path, toml), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "run").exists()


def test_print_config_round_trips(tmp_path, capsys):
    assert main(["run", "--task", "mlp_digits", "--set", "outer.lr=0.01", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert load_config(write(tmp_path, text)) == load_config(
        overrides=["task.name=mlp_digits", "outer.lr=0.01"])


def test_example_config_is_valid():
    config = load_config("examples/mlp_digits.toml")
    assert config.task.name == "mlp_digits"


def test_run_prints_the_table_and_plot_writes_pngs(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for text in ("initial", "tuned", "lam", "selection loss", "test loss (held out)",
                 str(run_dir)):
        assert text in out
    for name in ("config.toml", "hparams.json", "history.jsonl", "checkpoint.pt",
                 "result.json"):
        assert (run_dir / name).stat().st_size > 0
    assert main(["plot", str(run_dir)]) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 4
    for path in written:
        with open(path, "rb") as handle:
            data = handle.read()
        assert data.startswith(PNG) and len(data) > 5000
    # resuming the finished run prints the same table again
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert capsys.readouterr().out == out


def test_plot_of_a_missing_run_fails_clearly(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "history.jsonl does not exist" in capsys.readouterr().err


def test_check_calls_hyperdiff_check_on_the_task_problem(monkeypatch, capsys):
    seen = {}

    class Report:
        recommendation = "use reverse"

        def table(self):
            return "fake table"

    def check(problem, **options):
        seen["steps"] = problem.steps
        return Report()

    monkeypatch.setitem(sys.modules, "hyperdiff.diagnose.check",
                        types.SimpleNamespace(check=check))
    assert main(["check", "ridge_diabetes", "--steps", "7"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["fake table", "use reverse"]
    assert seen == {"steps": 7}


def test_check_without_the_check_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hyperdiff.diagnose.check", None)
    assert main(["check", "ridge_diabetes"]) == 2
    assert "hyperdiff.diagnose.check module must be installed" in capsys.readouterr().err


def test_console_script_points_at_main(capsys):
    scripts = entry_points(group="console_scripts")
    assert [e.value for e in scripts if e.name == "hyperdiff"] == ["hyperdiff.app.cli:main"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def exploding():
    """A method that works once, then always reports divergence (registered below)."""
    from test_driver import flaky

    return flaky(set(range(1, 1000)))


def test_a_run_whose_guard_gives_up_exits_1_and_cannot_be_resumed(tmp_path, capsys,
                                                                    monkeypatch):
    from hyperdiff.methods import registry

    monkeypatch.setitem(registry.METHODS, "exploding", "test_cli:exploding")
    run_dir = tmp_path / "run"
    args = [*SMALL, "--set", "method.name=exploding", "--set", "guard.max_failures=2"]
    assert main(["run", *args, "--out", str(run_dir)]) == 1
    assert "2 outer steps in a row failed" in capsys.readouterr().err
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["ok", "failed", "failed"]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "diverged"
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "divergence guard gave up" in capsys.readouterr().err
