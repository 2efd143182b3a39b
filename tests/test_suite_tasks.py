"""The head-to-head suite's tasks (benchmarks/suite_tasks/) and the suite's bookkeeping: every
task builds and trains, its splits are disjoint and deterministic for a data seed, the starts
10x / 100x off scale the learning rate, and a missing optional package is a skipped row."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import hyperdiff as hd

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TASK_DIR = BENCH / "suite_tasks"
OWN_SPLITS = ("char_lm", "shapes_cnn", "tabular_mlp", "gru_seq", "logistic_wide")


def load(name: str):
    """A suite task file (or the suite script) as a module."""
    for folder in (TASK_DIR, BENCH):  # suite.py and the task files import suite_common
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    path = BENCH / "suite.py" if name == "suite" else TASK_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"test_suite_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def row_set(x: torch.Tensor) -> set[bytes]:
    """The rows of ``x`` as bytes (to compare splits example by example)."""
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


@pytest.mark.parametrize("name", OWN_SPLITS)
def test_splits_disjoint_and_deterministic(name):
    module = load(name)
    first, again, other = module.data(0), module.data(0), module.data(1)
    rows = {split: row_set(first[split][0]) for split in ("train", "val", "test")}
    assert not rows["train"] & rows["test"]
    assert not rows["train"] & rows["val"]
    assert not rows["val"] & rows["test"]
    for split in first:
        for a, b in zip(first[split], again[split], strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(first["test"][0], other["test"][0])


@pytest.mark.parametrize("name", [*OWN_SPLITS, "reweight"])
def test_task_builds_and_trains(name):
    task = hd.tasks.build_task(f"{TASK_DIR / name}.py:build", steps=2)
    assert task.final_problem.steps == 2
    test = task.evaluate(seeds=(0,))["test"]
    assert math.isfinite(test["loss"]) and 0.0 <= test["accuracy"] <= 1.0


def test_starts_scale_the_learning_rate_only():
    module = load("gru_seq")
    base = module.build(steps=3).hparams.natural()
    for factor in (0.01, 0.1, 10.0, 100.0):
        factory = getattr(module, f"build_lr_x{factor:g}".replace(".", "p"))
        natural = factory(steps=3).hparams.natural()
        assert float(natural["lr_peak"]) == pytest.approx(factor * float(base["lr_peak"]))
        assert float(natural["wd"]) == float(base["wd"])


def test_missing_optional_package_is_a_skipped_row():
    suite = load("suite")
    task = hd.tasks.build_task(f"{TASK_DIR / 'logistic_wide'}.py:build", steps=2)
    missing = suite.LrFree("nothing", "hyperdiff_no_such_package", lambda m, p: None)
    row = suite.lr_free_row(task, missing, plain_s=1.0)
    assert row["method"] == "nothing" and "hyperdiff_no_such_package" in row["skipped"]
    summary = suite.summary([{"rows": [row]}], "tpe-100")
    assert summary["nothing"]["skipped"] == 1 and summary["nothing"]["tasks"] == 0


def test_summary_geometric_mean_and_wins():
    suite = load("suite")

    def r(method, loss):
        return {"method": method, "start": "x1", "test_loss": loss}

    blocks = [{"rows": [r("tpe-100", 0.5), r("a", 0.25), r("b", 1.0)]},
              {"rows": [r("tpe-100", 0.2), r("a", 0.8), r("b", 0.1)]}]
    out = suite.summary(blocks, "tpe-100")
    assert out["a"]["geomean_loss_ratio"] == pytest.approx(math.sqrt(0.5 * 4.0))
    assert out["b"]["geomean_loss_ratio"] == pytest.approx(math.sqrt(2.0 * 0.5))
    assert (out["a"]["wins"], out["b"]["wins"], out["tpe-100"]["wins"]) == (1, 1, 0)


DIVERGING_TASK = '''
import torch
import hyperdiff as hd

def build(steps=None, data_seed=0):
    x = torch.linspace(-1, 1, 64).reshape(-1, 1)
    def loss(p, h, batch):
        xb, yb = batch
        return ((xb * p["w"] - yb) ** 2).mean()
    return hd.task("diverging", model={"w": torch.zeros(1)}, train_loss=loss, val_loss=loss,
                   hparams=hd.HyperParameters(lr=hd.scalar(1e30)), optimizer=hd.sgd("lr"),
                   data=(x, 3 * x), steps=steps or 5, batch_size=None, probe=False)
'''


def test_a_run_that_diverges_at_the_start_is_a_row_with_a_note(tmp_path):
    suite = load("suite")
    path = tmp_path / "diverging.py"
    path.write_text(DIVERGING_TASK)
    row, steps = suite.hyperdiff_row(f"{path}:build", "offline", suite.QUICK, 1.0, "x100",
                                     tmp_path / "runs")
    assert row["method"] == "hd offline" and row["start"] == "x100"
    assert row["test_loss"] is None and row["note"].startswith("failed: ")
    assert "diverged" in row["note"] and steps == []
