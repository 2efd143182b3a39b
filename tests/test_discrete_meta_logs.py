"""Discrete choices, meta-learning samplers and loggers: the silent cases of the review of 7 Dec
(a loss error hidden by a Choice, a choice compared with ==, choices with one label, a CSV file
inside a logger's directory, samplers failing, drawing unseeded or returning bad data, keys a
meta run does not read, MLflow runs continued or mixed up)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.discrete_report import relaxed
from hyperdiff.app.loggers import scalars
from hyperdiff.app.mlflow_logger import MLflowLogger
from hyperdiff.engine.task_distribution import task_distribution
from hyperdiff.errors import LossError
from hyperdiff.tuner.driver import HyperOptimizer, Stopping

X = torch.linspace(-1, 1, 60).reshape(20, 3)
Y = X @ torch.tensor([1.0, -2.0, 0.5])
ACTS = {"tanh": torch.tanh, "relu": torch.relu}


def loss(p, h, b):
    return ((hd.choose(h["act"], ACTS, b[0] @ p["w"]) - b[1]) ** 2).mean()


def problem(batches=((X, Y),), steps=3):
    return hd.make_problem(loss, loss, hd.HyperParameters(act=hd.categorical(list(ACTS)),
                                                          lr=hd.scalar(0.1)),
                           {"w": torch.zeros(3)}, optimizer=hd.sgd("lr"),
                           train_data=list(batches), val_data=(X, Y), steps=steps)


# --- discrete choices -----------------------------------------------------------------------

def test_a_loss_error_with_a_discrete_hyperparameter_is_one_clear_error():
    late = problem([(X, Y), (X, Y), (X, Y), (X[:, :2], Y)], steps=4)
    with pytest.raises(LossError, match=r"train_loss raised RuntimeError at step 3 .*"
                       r"hyperparameters: \{'act': 'Choice', 'lr': \(\)\}"):
        hd.reverse()(late)


def test_a_choice_is_not_compared_or_read_as_a_number():
    def branchy(p, h, b):
        act = torch.tanh if h["act"] == "tanh" else torch.relu
        return ((act(b[0] @ p["w"]) - b[1]) ** 2).mean()

    with pytest.raises(hd.HyperdiffError, match=r"'act' is discrete .* \(compared with == \(a "
                       r"fixed choice's value is .value\)\); evaluate it with hd.choose"):
        hd.make_problem(branchy, branchy, hd.HyperParameters(act=hd.categorical(list(ACTS))),
                        {"w": torch.zeros(3)}, optimizer=hd.sgd(0.1), train_data=(X, Y),
                        val_data=(X, Y), steps=2)
    choice = problem().hparams.view(problem().hparams.raw)["act"]
    for misuse in (lambda c: c != "relu", lambda c: c.item(), lambda c: c % 2):
        with pytest.raises(hd.HyperdiffError, match="is discrete"):
            misuse(choice)
    with pytest.raises(hd.HyperdiffError, match=r"a mapping with a key for every choice "
                       r"\['tanh', 'relu'\] \(got a mapping without the keys \[\"'relu'\"\]\)"):
        hd.choose(choice, {"tanh": torch.tanh}, X)


def test_choices_must_have_distinct_labels():
    def act(x):
        return x

    def other():
        def act(x):  # the same __name__ as the first
            return -x
        return act

    for choices, label in (([act, other()], "act"), ([1, "1"], "1")):
        with pytest.raises(hd.HyperdiffError, match=rf"choices with distinct labels .* \(got "
                           rf"several choices labelled \['{label}'\]\)"):
            hd.categorical(choices)


def test_relaxed_temperatures_are_checked():
    hp = problem().hparams
    assert relaxed(hp, {"act": 0.5})["act"].current_temperature == 0.5
    with pytest.raises(hd.HyperdiffError, match=r"temperature of 'act' must be a positive "
                       r"finite number \(got -1.0\)"):
        relaxed(hp, {"act": -1.0})
    with pytest.raises(hd.HyperdiffError, match=r"must name discrete hyperparameters among "
                       r"\['act'\] \(got \['Act'\]\)"):
        relaxed(hp, {"Act": 0.5})


def test_scalars_name_a_choice_with_the_hyperparameters():
    seen = []
    HyperOptimizer(problem(), stopping=Stopping(max_steps=1)).run(
        callbacks=[lambda _opt, record: seen.append(record)])
    tags = scalars(seen[0], problem().hparams)
    assert {"hparam/act/p/tanh", "hparam/act/p/relu"} <= set(tags)


# --- log paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("logs, match", [
    (["log.mlflow=mlruns", "log.csv=mlruns/mlflow.db"],
     r"log.csv must be a file outside log.mlflow's directory, whose files the mlflow logger "
     r"owns"),
    (["log.tensorboard=tb", "log.csv=tb/inner"], r"log.csv must be a file outside "
                                                 r"log.tensorboard's directory"),
    (['log.csv="a\\u0000b"'], r"log.csv must be a path inside the run directory .* \(got "
                              r"'a\\x00b': a NUL character\)"),
])
def test_log_paths_that_would_break_a_logger_are_refused(logs, match):
    with pytest.raises(hd.HyperdiffError, match=match):
        load_config(overrides=["task.name=ridge_diabetes", *logs])


# --- meta-learning --------------------------------------------------------------------------

def meta_problem(sample):
    base = hd.make_problem(lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(),
                           lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(),
                           hd.HyperParameters(lr=hd.scalar(0.1)), {"w": torch.zeros(3)},
                           optimizer=hd.sgd("lr"), train_data=(X, Y), val_data=(X, Y), steps=2)
    return task_distribution(sample), base


def test_a_sampler_that_raises_is_named():
    pool = [((X, Y), (X, Y))] * 3
    tasks, base = meta_problem(lambda i, s: pool[i])
    with pytest.raises(hd.HyperdiffError, match=r"tasks: sample\(3, 7\) must return a task "
                       r"\(got IndexError: list index out of range\)"):
        tasks.problem(base, 3, 7)


def test_a_sampler_drawing_from_torchs_generator_draws_the_same_task_each_time():
    def noisy(i, s):
        x = X + torch.randn_like(X)
        return (x, Y), (x, Y)

    tasks, base = meta_problem(noisy)
    state = torch.get_rng_state()
    first = tasks.problem(base, 0, 5).val_data[0][0]
    assert torch.equal(tasks.problem(base, 0, 5).val_data[0][0], first)
    assert not torch.equal(tasks.problem(base, 1, 5).val_data[0][0], first)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_sampler_drawing_from_numpy_or_bad_data_is_refused():
    def numpy_noise(i, s):
        x = X + float(np.random.rand())
        return (x, Y), (x, Y)

    tasks, base = meta_problem(numpy_noise)
    with pytest.raises(hd.HyperdiffError, match=r"must draw its randomness from the seed it is "
                       r"given or from torch \(got draws from NumPy's np.random"):
        tasks.problem(base, 0, 5)
    nan = Y.clone()
    nan[0] = float("nan")
    tasks, base = meta_problem(lambda i, s: ((X, Y), (X, nan)))
    with pytest.raises(hd.HyperdiffError, match=r"tasks: task 0: query set must be finite"):
        tasks.problem(base, 0, 5)


def test_keys_a_meta_run_does_not_read_are_refused():
    with pytest.raises(hd.HyperdiffError, match=r"outer.samples must be left at its default 1 "
                       r"with outer.mode = 'meta' \(it is read by offline and online runs; got "
                       r"5\)"):
        load_config(overrides=["task.name=sinusoid_maml", "outer.samples=5"])


# --- MLflow ---------------------------------------------------------------------------------

def test_mlflow_starts_a_run_of_its_own_and_a_resume_relogs_missing_steps(tmp_path):
    pytest.importorskip("mlflow")
    records = []
    HyperOptimizer(problem(), stopping=Stopping(max_steps=3)).run(
        callbacks=[lambda _opt, record: records.append(record)])
    first = MLflowLogger(tmp_path / "mlruns")
    first.start([])
    second = MLflowLogger(tmp_path / "mlruns")
    second.start([])
    assert second.run_id != first.run_id  # a new run never continues another's MLflow run
    resumed = MLflowLogger(tmp_path / "mlruns")
    resumed.start(records)  # steps 0-2 were queued, never written, when the run was killed
    assert resumed.run_id == second.run_id
    history = resumed.client.get_metric_history(resumed.run_id, "loss/val")
    assert sorted(point.step for point in history) == [0, 1, 2]


def test_an_online_run_reports_the_choices_its_tuned_column_trains(tmp_path, capsys):
    from hyperdiff.app.cli import main
    from hyperdiff.app.tasks import build_task

    out = tmp_path / "online"
    assert main(["run", "--task", "arch_digits", "--set", "outer.mode=online", "--set",
                 "inner.steps=60", "--set", "report.seeds=1", "--quiet", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    spec = build_task("arch_digits", steps=60).hparams
    for name, probs in result["tuned"]["hparams"].items():
        if name not in result["discrete"]["choices"]:
            continue
        chosen = spec[name].choices[max(range(len(probs)), key=probs.__getitem__)]
        assert result["discrete"]["choices"][name] == chosen
        assert f"{chosen} (p {max(probs):.2f})" in table
    assert "an online run: its relaxed model is the run's own model" in table
