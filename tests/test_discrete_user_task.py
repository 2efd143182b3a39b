"""A user's own task with discrete hyperparameters (``hd.categorical``, no task_type): the
retrained-argmax report, a choice-aware ``hyperdiff compare``, and a compare that keeps the
phases it finished when a later one fails.

The oracle of every number is an independent retraining written here in plain torch
(``torch.optim.SGD``, full batch, float64) of the plain architecture chosen."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hyperdiff as hd
from hyperdiff.app import search
from hyperdiff.app.cli import main
from hyperdiff.app.rundir import CHECKPOINT
from hyperdiff.app.tasks import build_task, load_task_spec

ROWS, FEATURES, HIDDEN, CLASSES, STEPS, MOMENTUM = 90, 4, 6, 3, 8, 0.5
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}

TASK_FILE = textwrap.dedent(f'''
    import torch
    import torch.nn.functional as F

    import hyperdiff as hd

    ACTIVATIONS = {{"relu": torch.relu, "tanh": torch.tanh}}


    def data(seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn({ROWS}, {FEATURES}, generator=gen, dtype=torch.float64)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
        return x, y


    def init_params():
        gen = torch.Generator().manual_seed(1)
        sizes = {{"w1": ({FEATURES}, {HIDDEN}), "w2": ({HIDDEN}, {HIDDEN}),
                  "w3": ({HIDDEN}, {HIDDEN}), "out": ({HIDDEN}, {CLASSES})}}
        params = {{k: 0.5 * torch.randn(*s, generator=gen, dtype=torch.float64)
                   for k, s in sizes.items()}}
        params.update({{f"b{{i}}": torch.zeros({HIDDEN}, dtype=torch.float64) for i in (1, 2, 3)}})
        return params


    def forward(params, h, x):
        hidden, states = x, []
        for i in (1, 2, 3):
            hidden = hd.choose(h["activation"], ACTIVATIONS,
                               hidden @ params[f"w{{i}}"] + params[f"b{{i}}"])
            states.append(hidden)
        return hd.discrete.mix(h["depth"], states) @ params["out"]


    def loss(params, h, batch):
        x, y = batch
        return F.cross_entropy(forward(params, h, x), y)


    def build(steps={STEPS}):
        return hd.task(
            "user_arch", model=init_params(), train_loss=loss, val_loss=loss,
            hparams=hd.HyperParameters(lr=hd.scalar(0.3), depth=hd.categorical([1, 2, 3]),
                                       activation=hd.categorical(["relu", "tanh"])),
            optimizer=hd.sgd("lr", {MOMENTUM}),
            data=hd.given_splits(train=data(0), val=data(1), selection=data(2), test=data(3)),
            steps=steps, probe=False,
            defaults={{"outer.lr": 0.5, "stop.max_steps": 3, "report.seeds": 1}},
        )
''')


# compare runs TPE only where Optuna is installed (an optional extra; CI has none)
BLACK_BOX = ["random", "tpe"] if search.optuna_available() else ["random"]


@pytest.fixture
def task_ref(tmp_path: Path) -> str:
    path = tmp_path / "user_arch.py"
    path.write_text(TASK_FILE)
    return f"{path}:build"


def split(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The task file's data of one split, drawn again here."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, FEATURES, generator=gen, dtype=torch.float64)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()


def retrained_loss(lr: float, depth: int, activation: str, seed: int) -> float:
    """Independent oracle: the plain network (``depth`` layers of ``activation``) trained by
    torch.optim.SGD for STEPS full-batch steps from the task's theta_0; its loss on split
    ``seed`` (1 validation, 3 test)."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(FEATURES, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, CLASSES)]
    weights = [(0.5 * torch.randn(*s, generator=gen, dtype=torch.float64)).requires_grad_()
               for s in shapes]
    biases = [torch.zeros(HIDDEN, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    act = ACTIVATIONS[activation]

    def net(x: torch.Tensor) -> torch.Tensor:
        for w, b in zip(weights[:depth], biases[:depth], strict=True):
            x = act(x @ w + b)
        return x @ weights[3]

    used = [*weights[:depth], weights[3], *biases[:depth]]
    optimizer = torch.optim.SGD(used, lr=lr, momentum=MOMENTUM)
    x, y = split(0)
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    x, y = split(seed)
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


def test_run_reports_the_retrained_argmax_of_a_user_task(tmp_path, task_ref, capsys):
    out = tmp_path / "run"
    assert main(["run", "--task", task_ref, "--quiet", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    choices = result["discrete"]["choices"]
    assert choices["depth"] in (1, 2, 3) and choices["activation"] in ("relu", "tanh")

    best_raw = torch.load(out / CHECKPOINT, weights_only=False)["best"]["raw"]
    lr = float(hd.HyperParameters(lr=hd.scalar(0.3)).natural({"lr": best_raw["lr"]})["lr"])
    expected = retrained_loss(lr, choices["depth"], choices["activation"], seed=3)
    assert result["tuned"]["metrics"]["test"]["loss"] == pytest.approx(expected, rel=1e-9)
    assert result["discrete"]["gap"]["test"] == pytest.approx(
        expected - result["discrete"]["relaxed"]["test"]["loss"], rel=1e-9)

    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.strip()}
    assert rows["depth"][:2] == ["1", str(choices["depth"])]  # plain choices, not probabilities
    assert rows["activation"][:2] == ["relu", choices["activation"]]
    assert "(3 values)" not in table and "relaxation gap" in table


def test_compare_on_a_user_task_searches_plain_choices(tmp_path, task_ref, capsys,
                                                       monkeypatch):
    trials = []

    def recorded(task, values, **options):
        loss, metrics = evaluate_trial(task, values, **options)
        trials.append((dict(values), loss))
        return loss, metrics

    evaluate_trial = search.evaluate_trial
    monkeypatch.setattr(search, "evaluate_trial", recorded)
    assert main(["compare", "--task", task_ref, "--budget", "3", "--quiet",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert [m["method"] for m in report["methods"]] == ["hyperdiff", *BLACK_BOX]
    assert "failed" not in report and BLACK_BOX[-1] in capsys.readouterr().out
    assert len(trials) == 3 * len(BLACK_BOX)
    for values, loss in trials:
        assert values["depth"] in (1, 2, 3) and values["activation"] in ("relu", "tanh")
        expected = retrained_loss(values["lr"], values["depth"], values["activation"], seed=1)
        assert loss == pytest.approx(expected, rel=1e-9)

    space = build_task(task_ref).search_space
    assert isinstance(space["depth"], hd.tasks.SearchChoices) and space["depth"].choices == (1, 2, 3)
    assert space["activation"].choices == ("relu", "tanh")


@pytest.mark.parametrize("error, status", [(RuntimeError("search backend lost"), None),
                                           (hd.HyperdiffError("random: no trials"), 2)])
def test_a_failed_black_box_phase_keeps_the_hyperdiff_phase(tmp_path, task_ref, capsys,
                                                            monkeypatch, error, status):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(search, "random_search", fails)
    argv = ["compare", "--task", task_ref, "--budget", "2", "--quiet", "--out", str(tmp_path)]
    if status is None:  # a bug's traceback still reaches the caller
        with pytest.raises(RuntimeError, match="search backend lost"):
            main(argv)
    else:
        assert main(argv) == status
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert [m["method"] for m in report["methods"]] == ["hyperdiff"]
    assert report["methods"][0]["winner_metrics"]["test"]["loss"] > 0
    assert report["failed"] == {"method": "random", "not_run": BLACK_BOX[1:],
                                "error": f"{type(error).__name__}: {error}"}
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "hyperdiff" in table.split("failed")[0]
    not_run = "; not run: tpe" if "tpe" in BLACK_BOX else ""
    assert f"failed: random: {type(error).__name__}: {error}{not_run}" in table


def test_discrete_task_is_a_deprecated_alias_with_the_same_results(task_ref):
    with pytest.warns(DeprecationWarning, match="the replacement is nothing"):
        from hyperdiff.app.discrete_report import DiscreteTask
    plain = build_task(task_ref)
    spec = replace(load_task_spec(task_ref), task_type=DiscreteTask)
    old = spec.build()
    assert isinstance(old, DiscreteTask)
    values = {"lr": 0.2, "depth": 2, "activation": "tanh"}
    assert old.evaluate_values(values, (0,)) == plain.evaluate_values(values, (0,))
    assert plain.evaluate_values(values, (0,))["test"]["loss"] == pytest.approx(
        retrained_loss(0.2, 2, "tanh", seed=3), rel=1e-9)


@pytest.mark.parametrize("given", [hd.tasks.SearchRange(1.0, 3.0), hd.tasks.SearchChoices.of([1, 4])])
def test_a_discrete_hyperparameter_searched_as_numbers_is_refused_at_build(task_ref, given):
    """Before, the task built and `hyperdiff compare` failed only after its hyperdiff phase."""
    spec = replace(load_task_spec(task_ref), search_space={"depth": given})
    with pytest.raises(hd.HyperdiffError) as err:
        spec.build()
    assert str(err.value) == (
        "task user_arch: search_space['depth'] must be hd.tasks.SearchChoices.of(some of [1, 2, 3]) "
        f"for a discrete hyperparameter (got {given!r})")
