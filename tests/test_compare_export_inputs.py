"""``hyperdiff compare`` and the export to torch: the silent cases of the review of 7 Dec (a
scalar searched per coordinate, a non-offline mode compared as offline, a budget below one
trial, an --out refused after the tuning, NaN in comparison.json, a damaged comparison row, a
half-loaded module, a momentum schedule through 0)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import hyperdiff as hd
from hyperdiff.app.cli import main
from hyperdiff.app.cli.compare import compare, write_outputs
from hyperdiff.app.config import load_config
from hyperdiff.app.search import dimensions
from hyperdiff.app.tasks import build_task

TINY = ["task.name=ridge_diabetes", "inner.steps=5", "stop.max_steps=2", "report.seeds=1"]


def test_a_scalar_searched_per_coordinate_is_one_dimension():
    task = build_task("ridge_diabetes", steps=5)
    assert [(d.name, d.index) for d in dimensions(task, ["lam"])] == [("lam", None)]


@pytest.mark.parametrize("mode", ["online", "meta"])
def test_compare_refuses_a_mode_it_would_run_offline(mode):
    config = load_config(overrides=["task.name=ridge_diabetes", "inner.steps=5",
                                    "outer.mode=online"] if mode == "online" else
                         ["task.name=sinusoid_maml", "inner.steps=2", "stop.max_steps=2"])
    with pytest.raises(hd.HyperdiffError, match=rf"compare: outer.mode must be 'offline' \(got "
                       rf"'{mode}'\)"):
        compare(config, budget=3)


def test_a_budget_below_one_trial_is_refused_before_any_training():
    trained = []
    config = load_config(overrides=[*TINY, "task.cv_folds=3"])
    with pytest.raises(hd.HyperdiffError, match=r"--budget must be at least 3, the trainings of "
                       r"one trial \(3 cross-validation folds\) \(got 2\)"):
        compare(config, budget=2, on_phase=trained.append)
    assert trained == []  # refused before hyperdiff's phase


def test_an_out_that_is_a_file_is_refused_before_the_tuning(tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("mine")
    args = ["compare", "--task", "ridge_diabetes", "--set", "inner.steps=5", "--budget", "2",
            "--quiet", "--out", str(out)]
    assert main(args) == 2
    assert f"compare: --out {out} must be a directory or a new path (got an existing file)" in (
        capsys.readouterr().err)
    assert out.read_text() == "mine"


def test_comparison_json_holds_null_for_values_that_are_not_finite(tmp_path):
    report = {"task": "t", "methods": [], "best": float("inf"), "curve": [1.0, float("nan")]}
    written = write_outputs(report, str(tmp_path / "c"), "c")

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    parsed = json.loads((written / "comparison.json").read_text(), parse_constant=refuse)
    assert parsed["best"] is None and parsed["curve"] == [1.0, None]


def test_a_damaged_comparison_row_is_skipped_with_a_clear_error():
    comparison = {"task": "ridge_diabetes", "methods": [
        {"method": ["tpe"], "best": {"values": {"lam": 0.1}}},
        {"method": "random", "best": {"values": {"lam": 0.2}}}]}
    hparams = hd.HyperParameters(lam=hd.scalar(0.1))
    with pytest.raises(hd.HyperdiffError, match=r"method must be one of the methods that the "
                       r"result compared, \['random'\] \(got 'tpe'\)"):
        hd.tuned_hparams(hparams, comparison, method="tpe")
    assert float(hd.tuned_hparams(hparams, comparison, method="random").natural()["lam"]) == (
        pytest.approx(0.2))


def test_load_into_checks_every_value_before_copying_any():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    values = {k: torch.ones_like(v) for k, v in before.items()}
    values["1.bias"] = [0.0, 0.0]
    with pytest.raises(hd.HyperdiffError, match=r"load_into: params must be a dict name -> "
                       r"tensor"):
        hd.load_into(module, values)
    assert all(torch.equal(p, before[k]) for k, p in module.named_parameters())


def test_an_sgd_momentum_schedule_through_zero_is_not_exported():
    module = nn.Linear(3, 1)
    momentum = hd.schedule("warmup_cosine", 6)  # 0 at step 0
    hp = hd.HyperParameters(**momentum.hyperparameters(peak=0.9, warmup=0.3, final=0.5))
    with pytest.raises(hd.HyperdiffError, match=r"the SGD momentum must be nonzero at every step "
                       r"or zero at all \(got 0 at steps \[0\] of 6\)"):
        hd.torch_optimizer(hd.sgd(0.05, momentum), hp, module)


@pytest.mark.parametrize(("space", "said"), [
    ({"lam": "SearchRange(0.0, 1.0)"}, r"search_space\['lam'\] must be a range with low > 0 on "
                                       r"a log scale"),
    ({"lam": "SearchRange(1.0, 1e-3)"}, r"search_space\['lam'\] must be a range of finite "
                                        r"numbers low < high"),
    ({"lamda": "SearchRange(1e-3, 1.0)"}, r"search_space's names must be hyperparameters of "
                                          r"the task, among \['lam'\] \(got 'lamda'\)"),
    ({"lam": "(1e-3, 1.0)"}, r"search_space\['lam'\] must be a hd.tasks.SearchRange"),
    ({"lam": "SearchRange(-1.0, 1.0, log=False)"}, r"search_space\['lam'\] must be a range of "
                                                   r"values lam takes \(finite and > 0\)"),
])
def test_a_wrong_search_space_is_refused_when_the_task_is_built(tmp_path, space, said):
    """Each crashed inside math, numpy or the search after the tuning had run (until s39)."""
    entries = ", ".join(f"{k!r}: {v}" for k, v in space.items())
    task = tmp_path / "space_task.py"
    task.write_text(
        "import torch\nimport hyperdiff as hd\nSearchRange = hd.tasks.SearchRange\n\n"
        "def build(steps=5, data_seed=0):\n"
        "    x = torch.linspace(-1, 1, 80, dtype=torch.float64).reshape(40, 2)\n"
        "    mse = lambda p, h, b: ((b[0] @ p['w'] - b[1]) ** 2).mean()\n"
        "    return hd.task('space', model={'w': torch.zeros(2, dtype=torch.float64)},\n"
        "        train_loss=lambda p, h, b: mse(p, h, b) + h['lam'] * p['w'].square().sum(),\n"
        "        val_loss=mse, hparams=hd.HyperParameters(lam=hd.scalar(0.1)),\n"
        "        optimizer=hd.sgd(0.1), data=(x, x.sum(1)), steps=steps, stratify=False,\n"
        f"        search_space={{{entries}}})\n")
    with pytest.raises(hd.HyperdiffError, match=said):
        hd.tasks.build_task(f"{task}:build")


@pytest.mark.parametrize(("setting", "said"), [
    ("inner.warm_start=true", "compare: inner.warm_start must be false: a warm-started "
                              "training continues the last one"),
    ("log.csv=steps.csv", r"compare: the \[log\] settings are written by `hyperdiff run` only "
                          r"\(got log.csv = 'steps.csv'\)"),
])
def test_compare_refuses_settings_it_would_not_honour(setting, said):
    """Warm starts made hyperdiff's best validation loss one no black-box trial could reach
    (and its winner retrained unlike its tuning); [log] was ignored (until s39)."""
    config = load_config(overrides=["task.name=ridge_diabetes", "inner.steps=5", setting])
    with pytest.raises(hd.HyperdiffError, match=said):
        compare(config, budget=3)


def test_a_search_trial_evaluates_only_the_splits_it_reads():
    """A trial used to pay for the train and test splits' metrics, which the search drops: 9%
    of a trial on the suite's shapes_cnn, so fewer trials in hyperdiff's time (until s39)."""
    from hyperdiff.app.search import evaluate_trial
    from hyperdiff.app.tasks import build_task

    task = build_task("ridge_diabetes", steps=5)
    values = {"lam": 0.3}
    full = task.evaluate_values(values, (3,))
    whole = task.train_and_evaluate(values, seed=3)
    assert whole == {f"{split}_{key}": value for split, m in full.items() if split != "train"
                     for key, value in m.items()}  # bit for bit
    seen = []
    metrics = task.metrics

    def counting(*args, **kw):
        seen.append(args)
        return metrics(*args, **kw)

    object.__setattr__(task, "metrics", counting)
    value, found = evaluate_trial(task, values, seed=3, objective="val_loss")
    assert value == whole["val_loss"] and set(found) <= {"val_loss", "selection_loss"}
    batches = sum(len(task.splits[s]) for s in task.splits if s in ("val", "selection"))
    assert len(seen) == batches  # no train or test batch


def test_compare_refuses_an_outer_seed_among_the_report_seeds():
    config = load_config(overrides=["task.name=ridge_diabetes", "inner.steps=5",
                                    "outer.seed=1000001"])
    with pytest.raises(hd.HyperdiffError, match=r"outer.seed must not be one of the report's "
                       r"seeds \[1000000, 1000001, 1000002\] \(got 1000001\)"):
        compare(config, budget=3)
