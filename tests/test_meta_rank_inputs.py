"""Meta-learning and torchrun inputs (s40 review): without validation tasks a meta run does
not stop early on its batch losses (losses of other tasks: it stopped a user task at step 12
of 100, worse than its start); first-order methods refuse hyperparameters that only the inner
optimizer reads (Meta-SGD's learning rates got a zero hypergradient and never moved); and the
ranks of a torchrun job must run the same config and data (rank 0 recorded its own config while
rank 1 trained its share of the steps with another outer lr)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_jobs import free_port

import hyperdiff as hd

D = torch.float64


def sample(index: int, seed: int):
    """A regression task y = a x + c: 6 support and 5 query points."""
    g = torch.Generator().manual_seed(seed)
    a, c = torch.randn(2, generator=g, dtype=D)
    xs, xq = torch.randn(6, 1, generator=g, dtype=D), torch.randn(5, 1, generator=g, dtype=D)
    return (xs, a * xs + c), (xq, a * xq + c)


def mse(p, h, batch):
    return ((batch[0] @ p["w"] + p["b"] - batch[1]) ** 2).mean()


def template(lr=0.3) -> hd.Problem:
    params = {"w": torch.zeros(1, 1, dtype=D), "b": torch.zeros(1, dtype=D)}
    hparams = {"theta0": hd.initialization(params)}
    if isinstance(lr, str):
        hparams[lr] = hd.scalar(0.3)
    support, query = sample(0, 1)
    return hd.make_problem(mse, mse, hd.HyperParameters(**hparams), params,
                           optimizer=hd.sgd(lr), train_data=support, val_data=query, steps=3)


def test_without_validation_tasks_patience_is_refused_and_a_meta_run_goes_to_its_budget():
    def loop(validation_tasks=0, patience=2):
        return hd.HyperOptimizer(template(), plan=hd.plans.MetaPlan(
            sample, batch=2, validation_tasks=validation_tasks), method="reverse", seed=0,
            lr=0.5, schedule="constant", stopping=hd.Stopping(max_steps=40, patience=patience))

    with pytest.raises(hd.HyperdiffError, match="patience"):  # s41: was accepted and unread
        loop().run()
    unranked = loop(patience=None).run()
    assert len(unranked.history) == 40 and unranked.stop_reason == "budget: 40 outer steps"
    ranked = loop(validation_tasks=2).run()  # with validation tasks patience still counts
    assert ranked.stop_reason.startswith("early stopping: no better selection loss for 2")


@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_first_order_methods_refuse_what_only_the_inner_optimizer_reads(method):
    with pytest.raises(hd.HyperdiffError, match=rf"{method}: the hyperparameters \['lr'\] are "
                       "read by the inner optimizer, which a first-order method does not "
                       "differentiate"):
        hd.HyperOptimizer(template("lr"), plan=hd.plans.MetaPlan(sample, batch=2),
                          method=method).run()
    plan = hd.plans.MetaPlan(sample, batch=2)
    assert len(hd.HyperOptimizer(template(), plan=plan, method=method,
                                 stopping=hd.Stopping(max_steps=2)).run().history) == 2


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_torchrun_ranks_with_other_settings_are_refused(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys\nfrom hyperdiff.app.cli import main\nargs = sys.argv[1:]\n"
        "if os.environ['RANK'] == '1':\n    args += ['--set', 'outer.lr=0.5']\n"
        "sys.exit(main(args))\n")
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
               "run", "--task", "ridge_diabetes", "--set", "stop.max_steps=2", "--set",
               "outer.samples=2", "--set", "report.seeds=1", "--out", str(tmp_path / "run")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert ("run: every rank of a torchrun job must run the same config and inputs (got rank 1 "
            "differing from rank 0 in outer.lr: 0.05 on rank 0, 0.5 on rank 1)") in output, output
    assert not (tmp_path / "run" / "history.jsonl").exists()
