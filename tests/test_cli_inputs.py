"""Command-line inputs that used to leave a dead run directory, print a traceback, give advice
that fails, or be ignored without a word (the review of 7 Dec), and the library checks found
with them (online method options, ``tuned_hparams``, ``implicit`` with a direct term)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.config import load_config
from hyperdiff.tuner.driver import HyperOptimizer

TINY = ["--task", "ridge_diabetes", "--set", "inner.steps=5", "--set", "stop.max_steps=3",
        "--set", "report.seeds=1", "--quiet"]


def run(*args: str) -> int:
    return main(["run", *args])


def error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (its last steps still moving: the result holds a warning)."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert run(*TINY, "--out", str(out)) == 0
    return out


# --- a run refused before its first step leaves nothing behind ------------------------------

def test_a_method_the_task_cannot_use_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "R"
    assert run(*TINY, "--set", "method.name=fomaml", "--out", str(out)) == 2
    assert "fomaml: problem must tune its initialization" in error(capsys)
    assert not out.exists()
    assert run(*TINY, "--out", str(out)) == 0  # the corrected command, the same --out
    assert json.loads((out / "result.json").read_text())["status"] == "finished"


def test_an_existing_directory_keeps_what_it_held(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run(*TINY, "--set", "method.name=fomaml", "--out", str(out)) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --- damaged files of a finished run ---------------------------------------------------------

@pytest.mark.parametrize("damage", [
    lambda r: r.update(time_s="x"),
    lambda r: r.update(sizes=None),
    lambda r: r.update(warnings=5),
    lambda r: r.pop("run_dir"),
    lambda r: r["tuned"].update(hparams={}),
    lambda r: r["initial"]["metrics"]["val"].update(loss=None),
])
def test_a_damaged_result_is_one_line(finished, tmp_path, capsys, damage):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    result = json.loads((copy / "result.json").read_text())
    damage(result)
    (copy / "result.json").write_text(json.dumps(result))
    assert run("--resume", str(copy)) == 2
    assert error(capsys).startswith(f"hyperdiff run: error: run directory: {copy}/result.json "
                                    "is damaged (")


@pytest.mark.parametrize("inputs", [{"task": 5}, {"data": []}, {"data": {"train": 3}}])
def test_damaged_inputs_in_the_manifest_are_one_line(finished, tmp_path, capsys, inputs):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["inputs"].update(inputs)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert run("--resume", str(copy), "--set", "stop.max_steps=5") == 2
    assert "manifest.json is damaged (ValueError: 'inputs' must be an object of objects" in (
        error(capsys))


# --- advice that names where the run is and how it started ----------------------------------

def test_a_copied_run_names_the_copy_and_quotes_its_path(finished, tmp_path, capsys):
    copy = tmp_path / "my copy"
    shutil.copytree(finished, copy)
    assert run("--resume", str(copy)) == 0
    out = capsys.readouterr().out
    assert f"run directory: {copy}" in out
    stored = json.loads((copy / "result.json").read_text())
    assert stored["run_dir"] == str(finished)  # the file itself is not rewritten
    moving = [w for w in stored.get("warnings", []) if "still moving" in w]
    assert moving, "the tiny run is expected to end still moving"
    assert f"--resume '{copy}' --set stop.max_steps=" in out


def test_the_new_run_advice_of_a_run_started_from_another_keeps_its_start(finished, tmp_path,
                                                                          capsys):
    out = tmp_path / "from"
    assert run(*TINY, "--from", str(finished), "--out", str(out)) == 0
    with (out / "checkpoint.pt").open("ab") as f:
        f.write(b"x")
    assert run("--resume", str(out), "--set", "stop.max_steps=6") == 2
    assert f"(`hyperdiff run {out}/config.toml --from {finished} --out NEW_DIR`)" in (
        error(capsys))


# --- config values ---------------------------------------------------------------------------

@pytest.mark.parametrize("override, match", [
    ("outer.seed=18446744073709551616",
     r"outer.seed must be an int in \[0, 9223372036854775807\]"),
    ("task.data_seed=4294967296", r"task.data_seed must be an int in \[0, 4294967295\]"),
])
def test_seeds_state_their_upper_bound(override, match):
    with pytest.raises(hd.HyperdiffError, match=match):
        load_config(overrides=["task.name=ridge_diabetes", override])


@pytest.mark.parametrize("overrides, match", [
    (["outer.window=8"], r"outer.window must be left at its default 5 with outer.mode = "
                         r"'offline' \(it is read by online runs only; got 8\)"),
    (["outer.normalize=true"], r"outer.normalize must be left at its default False"),
    (["outer.mode=online", "inner.warm_start=true"],
     r"inner.warm_start must be left at its default False with outer.mode = 'online' \(it "
     r"is read by offline runs only; got True\)"),
    (["outer.mode=online", "outer.meta_batch=8"], r"outer.meta_batch .* read by meta runs"),
])
def test_a_key_only_another_mode_reads_is_refused(overrides, match):
    with pytest.raises(hd.HyperdiffError, match=match):
        load_config(overrides=["task.name=ridge_diabetes", *overrides])


def test_a_mode_only_key_at_its_default_or_off_is_accepted():
    config = load_config(overrides=["task.name=ridge_diabetes", "outer.window=5",
                                    "outer.val_batch=0", "outer.normalize=false"])
    assert config.outer.mode == "offline"


def test_a_tuple_typed_task_param_reads_a_toml_array(tmp_path):
    path = tmp_path / "arch.toml"
    path.write_text('[task]\nname = "arch_digits"\n[task.params]\ntemperature = [1.0, 0.3]\n')
    assert load_config(path).task.params["temperature"] == (1.0, 0.3)
    given = load_config(overrides=["task.name=arch_digits",
                                   "task.params.temperature=[1.0, 0.3]"])
    assert given.task.params["temperature"] == (1.0, 0.3)
    assert load_config(data=given.to_dict()).task.params["temperature"] == (1.0, 0.3)
    with pytest.raises(hd.HyperdiffError, match="task.params.temperature must be"):
        load_config(overrides=["task.name=arch_digits",
                               "task.params.temperature=[1.0, 0.3, 0.1]"])


def test_two_task_names_are_refused(capsys):
    assert run(*TINY, "--set", "task.name=logistic_cancer") == 2
    assert ("--task and --set task.name must name the same task, or give one of them (got "
            "--task ridge_diabetes and task.name = logistic_cancer)") in error(capsys)
    assert main(["check", "ridge_diabetes", "--task", "logistic_cancer", "--steps", "5"]) == 2
    assert ("the task must be named once, or the same each time (got TASK ridge_diabetes, "
            "--task logistic_cancer)") in error(capsys)


# --- library checks found with them ----------------------------------------------------------

D = torch.float64
X = torch.linspace(-1, 1, 100, dtype=D).reshape(20, 5)
Y = X @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=D)
C = 0.1  # the validation loss prices the penalty too: a direct term C * lam


def ridge(val_direct: float = C, steps: int = 3):
    def train_loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean() + h["lam"] * (p["w"] ** 2).sum()

    def val_loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean() + val_direct * h["lam"]

    return hd.make_problem(train_loss, val_loss, hd.HyperParameters(lam=hd.scalar(0.1)),
                           {"w": torch.zeros(5, dtype=D)}, optimizer=hd.sgd(0.2),
                           train_data=(X[:12], Y[:12]), val_data=(X[12:], Y[12:]), steps=steps)


def test_implicit_with_a_direct_term_matches_the_closed_form():
    lam = torch.tensor(0.1, dtype=D, requires_grad=True)
    xt, yt, xv, yv = X[:12], Y[:12], X[12:], Y[12:]
    # theta*(lam) of mean((x w - y)^2) + lam |w|^2, solved in float64 by torch.linalg
    w = torch.linalg.solve(2 * xt.T @ xt / 12 + 2 * lam * torch.eye(5, dtype=D),
                           2 * xt.T @ yt / 12)
    value = ((xv @ w - yv) ** 2).mean() + C * lam
    (dlam,) = torch.autograd.grad(value, lam)
    problem = ridge(steps=3000)
    for solver in ("cg", "exact"):
        got = hd.implicit(solver, warn=False)(problem).grad_natural["lam"]
        torch.testing.assert_close(got, dlam.detach(), rtol=1e-6, atol=0)


def test_an_online_window_refuses_options_it_does_not_read():
    with pytest.raises(hd.HyperdiffError, match=r"method's option fixed_point must be its "
                       r"default: an online window reads only \['solver'\] of implicit "
                       r"\(got True\)"):
        HyperOptimizer(ridge(steps=20), plan=hd.plans.OnlinePlan(window=5),
                       method=hd.implicit(fixed_point=True)).step()


def test_tuned_values_are_checked_against_the_task(finished, tmp_path):
    vector = hd.HyperParameters(lam=hd.per_feature(0.01, size=30))
    with pytest.raises(hd.HyperdiffError, match=r"tuned value of 'lam' must have the shape "
                       r"\(30,\) of the task's per_feature 'lam' \(got shape \(\)"):
        hd.tuned_hparams(vector, finished)
    result = json.loads((finished / "result.json").read_text())
    result["tuned"]["hparams"]["lam"] = "abc"
    with pytest.raises(hd.HyperdiffError, match=r"tuned value of 'lam' must be a number or a "
                       r"list of numbers \(got 'abc'\)"):
        hd.tuned_hparams(hd.HyperParameters(lam=hd.scalar(0.1)), result)
    other = HyperOptimizer(ridge(steps=3)).run()
    with pytest.raises(hd.HyperdiffError, match=r"has no values for \['lr'\]; it holds "
                       r"\['lam'\]"):
        hd.tuned_hparams(hd.HyperParameters(lr=hd.scalar(0.1)), other)
    assert float(hd.tuned_hparams(hd.HyperParameters(lam=hd.scalar(1.0)), other).natural()[
        "lam"]) == float(other.best_hparams.natural()["lam"])


def test_an_online_result_exports_the_values_it_ended_with():
    online = HyperOptimizer(ridge(steps=20), plan=hd.plans.OnlinePlan(window=5)).run()
    tuned = hd.tuned_hparams(hd.HyperParameters(lam=hd.scalar(1.0)), online)
    assert float(tuned.natural()["lam"]) == float(online.final_hparams.natural()["lam"])
    assert float(tuned.natural()["lam"]) != 0.1  # it moved


def test_online_implicit_refuses_hyperparameters_it_cannot_see():
    def loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    problem = hd.make_problem(loss, loss, hd.HyperParameters(lr=hd.scalar(0.1)),
                              {"w": torch.zeros(5, dtype=D)}, optimizer=hd.sgd("lr"),
                              train_data=(X[:12], Y[:12]), val_data=(X[12:], Y[12:]), steps=20)
    with pytest.raises(hd.HyperdiffError, match=r"implicit \(an online window\): at least one "
                       r"hyperparameter must be read by train_loss or val_loss \(got \['lr'\]"):
        HyperOptimizer(problem, plan=hd.plans.OnlinePlan(window=5),
                       method=hd.implicit()).step()
    HyperOptimizer(ridge(steps=20), plan=hd.plans.OnlinePlan(window=5),
                   method=hd.implicit()).step()  # lam is read by the loss: tuned


@pytest.mark.parametrize("make, seen", [
    (lambda tmp: (tmp / "L").symlink_to(tmp / "missing") or tmp / "L",
     "L, a symbolic link to a missing target"),
    (lambda tmp: (tmp / "L").symlink_to(tmp / "missing") or tmp / "L" / "x",
     "L, a symbolic link to a missing target"),
    (lambda tmp: (tmp / "f").write_text("x") and tmp / "f", "f, an existing file"),
])
def test_an_out_that_cannot_be_a_directory_names_what_is_in_the_way(tmp_path, capsys, make,
                                                                    seen):
    out = make(tmp_path)
    assert run(*TINY, "--out", str(out)) == 2
    message = error(capsys)
    assert f"the run directory {out} (--out or output.dir) must be a directory or a new path" in (
        message)
    assert f"(got {tmp_path}/{seen})" in message


def test_method_option_errors_name_the_config_keys(tmp_path, capsys):
    assert run(*TINY, "--set", "method.name=truncated", "--out", str(tmp_path / "t")) == 2
    assert ("config: [method] (method.name = 'truncated', its options method.NAME = VALUE): "
            "truncated: k must be a positive int") in error(capsys)
    assert run(*TINY, "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "u")) == 2
    assert "holds no run (to resume, or to start from)" in error(capsys)


def test_a_state_of_the_other_plan_is_named_as_such():
    online = HyperOptimizer(ridge(steps=20), plan=hd.plans.OnlinePlan(window=5))
    online.step()
    offline = HyperOptimizer(ridge(steps=20))
    offline.step()
    with pytest.raises(hd.HyperdiffError, match=r"the state must be an offline run's \(got an "
                       r"online run's"):
        HyperOptimizer(ridge(steps=20)).load_state_dict(online.state_dict(),
                                                        list(online.history))
    with pytest.raises(hd.HyperdiffError, match=r"the state must be an online run's \(got an "
                       r"offline run's"):
        HyperOptimizer(ridge(steps=20), plan=hd.plans.OnlinePlan(window=5)).load_state_dict(
            offline.state_dict(), list(offline.history))


def test_a_quiet_interrupted_run_still_says_how_to_continue(tmp_path, capsys, monkeypatch):
    step = HyperOptimizer.step

    def interrupted(self):
        if self.step_index == 1:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(HyperOptimizer, "step", interrupted)
    out = tmp_path / "stopped run"
    assert run(*TINY, "--out", str(out)) == 130
    assert error(capsys) == (f"hyperdiff run: interrupted after outer step "
                             f"1; continue with `hyperdiff run --resume '{out}'`")


def test_a_number_given_for_a_string_key_suggests_quotes():
    with pytest.raises(hd.HyperdiffError, match=r"log.csv must be a string \(got 123; to mean "
                       r"the text, quote it: --set 'log.csv=\"123\"' or csv = \"123\" in TOML\)"):
        load_config(overrides=["task.name=ridge_diabetes", "log.csv=123"])


def test_an_edited_hparams_file_is_not_advised_as_an_input(finished, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "hparams.json").write_text((copy / "hparams.json").read_text() + " ")
    assert run("--resume", str(copy)) == 2
    assert error(capsys).endswith("restore the original, or change the hyperparameters in the "
                                  "task (a run writes hparams.json to describe them, never reads "
                                  "it) and start a new run")


def test_an_extension_that_failed_to_start_goes_on_when_repeated(finished, tmp_path, capsys,
                                                                 monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    step = HyperOptimizer.step

    def refused(self):
        raise hd.HyperdiffError("refused for the test")

    monkeypatch.setattr(HyperOptimizer, "step", refused)
    assert run("--resume", str(copy), "--set", "stop.max_steps=5") == 2
    monkeypatch.setattr(HyperOptimizer, "step", step)
    assert run("--resume", str(copy), "--set", "stop.max_steps=5") == 0  # the same command
    assert len((copy / "history.jsonl").read_text().splitlines()) == 5
    manifest = json.loads((copy / "manifest.json").read_text())
    assert [{k: v for k, v in e.items() if k != "config_sha256_before"}
            for e in manifest["extensions"]] == [{"step": 3, "from_max_steps": 3,
                                                  "to_max_steps": 5}]


def test_a_damaged_mlflow_store_is_one_line(tmp_path, capsys):
    pytest.importorskip("mlflow")
    out = tmp_path / "logged"
    assert run(*TINY, "--set", "log.mlflow=mlruns", "--out", str(out)) == 0
    (out / "mlruns" / "mlflow.db").write_bytes(b"SQLite format 3\0garbage")
    assert run("--resume", str(out), "--set", "stop.max_steps=5") == 2
    assert error(capsys).startswith(f"hyperdiff run: error: log: the MLflow store {out}/mlruns/"
                                    "mlflow.db must be an MLflow database (got ")
