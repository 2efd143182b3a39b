"""Meta runs on 2 gloo ranks: the meta-batch's tasks are spread over the ranks (rank ``r``
adapts tasks ``i`` with ``i % 2 == r``, the validation tasks likewise), and the run's history
(meta-hypergradients, losses, selection losses) and result equal the single-process run's
(float64, <= 1e-10); ``torchrun -m hyperdiff run --task sinusoid_maml`` writes the history
and result of the same run in one process (float32: to rounding, as the ranks' vmapped batches
have other sizes).

The references run here in one process; the ranks are forked from this process
(tests/distributed_jobs.py's ``launch``, with a hard timeout), or started by torchrun as real
processes (``subprocess`` timeouts).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import distributed_jobs
import pytest
import torch
from distributed_jobs import WORLD, close, free_port, launch

import hyperdiff as hd
from hyperdiff.app.rundir import RunDir
from hyperdiff.app.tasks.few_shot import sinusoid_task
from hyperdiff.seeds import meta_task, task_seed

pytestmark = pytest.mark.skipif(
    "fork" not in mp.get_all_start_methods() or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo and the fork start method")

D = torch.float64
BATCH, STEPS, VALIDATION, SEED, LR = 3, 3, 3, 2, 0.02  # 3 tasks: rank 0 adapts two, rank 1 one


def sample(index: int, seed: int):
    task = sinusoid_task(0, shots=5, queries=5, seed=seed, dtype=D)
    return task.support, task.query


def fingerprint(support: Any) -> float:
    return float(support[0].sum())


def meta_loop(seen: set[float], method: str) -> hd.HyperOptimizer:
    """A 1-8-8-1 tanh MLP on float64 sinusoid tasks; every support set trained on goes into
    ``seen`` (by its fingerprint)."""
    g = torch.Generator().manual_seed(0)
    sizes = [(1, 8), (8, 8), (8, 1)]
    params = {f"w{i}": torch.randn(*s, generator=g, dtype=D) / s[0] ** 0.5
              for i, s in enumerate(sizes)} | {f"b{i}": torch.zeros(s[1], dtype=D)
                                                for i, s in enumerate(sizes)}

    def net(p, x):
        h = torch.tanh(x @ p["w0"] + p["b0"])
        h = torch.tanh(h @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"]

    def mse(p, h, batch):
        return ((net(p, batch[0]) - batch[1]) ** 2).mean()

    def train_loss(p, h, batch):
        seen.add(fingerprint(batch))
        return mse(p, h, batch)

    support, query = sample(0, 10**6)
    problem = hd.make_problem(train_loss, mse,
                              hd.HyperParameters(theta0=hd.initialization(params)), params,
                              optimizer=hd.sgd(0.05), train_data=support, val_data=query,
                              steps=2)
    plan = hd.plans.MetaPlan(sample, batch=BATCH, validation_tasks=VALIDATION)
    return hd.HyperOptimizer(problem, plan=plan, method=method, lr=LR, seed=SEED,
                             schedule="constant", stopping=hd.Stopping(max_steps=STEPS))


def meta_run(method: str) -> tuple[list[dict[str, Any]], dict[str, Any], set[float]]:
    """The run's records (without timing), result values and the support sets it trained."""
    seen: set[float] = set()
    loop = meta_loop(seen, method)
    result = loop.run()
    values = {"best_raw": result.best_raw, "final_raw": result.final_raw,
              "best_step": result.best_step, "best_loss": result.best_loss}
    return [r.without_timing() for r in loop.history], values, seen


def owned(rank: int) -> tuple[set[float], set[float]]:
    """The fingerprints of the batch and validation tasks that ``rank`` adapts, and of those
    the other rank adapts."""
    tasks = [[sample(*meta_task(SEED, s, BATCH, i))[0] for i in range(BATCH)]
             for s in range(STEPS)]
    validation = [sample(j, task_seed(SEED, j, "meta-validation"))[0]
                  for j in range(VALIDATION)]
    mine, others = set(), set()
    for row in [*tasks, validation]:
        for i, support in enumerate(row):
            (mine if i % WORLD == rank else others).add(fingerprint(support))
    return mine, others


METHODS = ["reverse", "fomaml"]


def job_meta(rank: int, out: str, report: Any) -> None:
    for method in METHODS:
        report(method, pickle.dumps(meta_run(method)))


distributed_jobs.JOBS["meta"] = job_meta  # the forked ranks look their job up there


@pytest.fixture(scope="module")
def runs():
    references = {method: meta_run(method) for method in METHODS}
    reports, codes, hung = launch("meta", "", timeout=240.0)
    assert not hung and codes == [0, 0], (codes, hung, reports)
    return references, {key: pickle.loads(value) for key, value in reports.items()}


@pytest.mark.parametrize("method", METHODS)
def test_a_meta_run_on_two_ranks_gives_the_one_process_run(runs, method):
    references, reports = runs
    history, values, seen = references[method]
    assert len(history) == STEPS
    assert all(r["selection_loss"] is not None for r in history)
    assert max(abs(v) for r in history for v in r["grad"]["theta0"]) > 1e-4  # real gradients
    every = set().union(*owned(0))
    assert every <= seen  # one process adapts every task
    for rank in range(WORLD):
        got_history, got_values, got_seen = reports[rank, method]
        assert close(got_history, history, 1e-10), (method, rank)
        assert close(got_values, values, 1e-10), (method, rank)
        mine, others = owned(rank)
        assert mine <= got_seen, (method, rank)  # this rank's share of the tasks...
        assert not others & got_seen, (method, rank)  # ...and none of the other rank's


# ---------------------------------------------------------------------- torchrun, the CLI
CLI = ["run", "--task", "sinusoid_maml", "--set", "outer.meta_batch=3",
       "--set", "stop.max_steps=3", "--set", "inner.steps=2", "--set", "outer.meta_val_tasks=3",
       "--set", "outer.meta_test_tasks=3", "--set", "report.seeds=1"]
SRC = str(Path(__file__).parents[1] / "src")


def cli(out: Path, ranks: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc_per_node",
                                      str(ranks), "--master_addr", "127.0.0.1",
                                      "--master_port", str(free_port())]
    command = [sys.executable, *launcher, "-m", "hyperdiff", *CLI, "--out", str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def written(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    history = [r.without_timing() for r in RunDir(out).read_history()]
    result = json.loads((out / "result.json").read_text())
    return history, {k: v for k, v in result.items() if k not in ("time_s", "run_dir")}


def test_torchrun_hyperdiff_run_meta_writes_the_one_process_run(tmp_path):
    one, two = cli(tmp_path / "one", 1), cli(tmp_path / "two", WORLD)
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    assert "distributed: rank 1 of 2 (gloo)" in two.stderr, two.stderr
    history, result = written(tmp_path / "one")
    got_history, got_result = written(tmp_path / "two")
    assert len(history) == 3 and result["mode"] == "meta"
    # sinusoid_maml is float32 and each rank stacks its share of the tasks into one vmapped
    # batch (2 and 1 tasks where one process stacks 3): batched kernels of another batch size
    # round differently, so the runs agree to float32 rounding (measured: up to 8e-8)
    assert close(got_history, history, 1e-6)
    assert close(got_result, result, 1e-6)
