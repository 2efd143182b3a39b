"""torch.distributed: 2 gloo ranks on 127.0.0.1 against the single-process results.

Each test starts its ranks itself (``multiprocessing`` spawn) with a hard timeout, so a hung
rank fails the test instead of hanging it. Several checks share one start-up.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
from datetime import timedelta
from typing import Any

import pytest
import torch

import hyperdiff as hd
from hyperdiff.config import load_config
from hyperdiff.distributed.data_parallel import ShardedBatches
from hyperdiff.driver import HyperOptimizer, Stopping
from hyperdiff.experiment import run_experiment
from hyperdiff.rundir import RunDir

WORLD = 2
STEPS = 6
SETTINGS = ["task.name=mlp_digits", "inner.steps=8", "inner.warm_start=true",
            "outer.samples=2", "stop.max_steps=4", "report.seeds=1"]
KILL_AT_TRAINING = 5  # rank 1 dies inside outer step 2 (trainings 4, 5 are that step's)


# ---------------------------------------------------------------------- problems
def mlp_problem(batch_size: int = 8) -> hd.Problem:
    """A float64 tanh MLP with a per-step learning rate, momentum and weight decay."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    xv = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    yv = torch.sin(xv.sum(1, keepdim=True))
    params = {"w1": 0.5 * torch.randn(3, 6, generator=gen, dtype=torch.float64),
              "b1": torch.zeros(6, dtype=torch.float64),
              "w2": 0.5 * torch.randn(6, 1, generator=gen, dtype=torch.float64)}

    def predict(p, xb):
        return torch.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"]

    def train_loss(p, h, batch):
        xb, yb = batch
        l2 = sum((v**2).sum() for v in p.values())
        return ((predict(p, xb) - yb) ** 2).mean() + 0.5 * h["wd"] * l2

    def val_loss(p, h, batch):
        xb, yb = batch
        return ((predict(p, xb) - yb) ** 2).mean()

    hparams = hd.HyperParameters(lr=hd.per_step(STEPS, 0.2), wd=hd.scalar(1e-2))
    return hd.make_problem(train_loss, val_loss, hparams, params,
                           optimizer=hd.sgd(lr="lr", momentum=0.9),
                           train_data=hd.minibatches(x, y, batch_size=batch_size),
                           val_data=(xv, yv), steps=STEPS, probe=False)


def selection_split() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    return xs, torch.sin(xs.sum(1, keepdim=True))


def outer_loop(method: Any = "reverse", samples: int = 3, steps: int = 2) -> HyperOptimizer:
    return HyperOptimizer(mlp_problem(), method=method, samples=samples, lr=0.1,
                          warm_start=True, selection=selection_split(),
                          stopping=Stopping(max_steps=steps))


def dp_methods() -> dict[str, hd.Method]:
    return {"reverse": hd.reverse(), "forward": hd.forward(),
            "checkpointed": hd.checkpointed(segments=2)}


def records(opt: HyperOptimizer) -> list[dict]:
    return [r.without_timing() for r in opt.history]


# ---------------------------------------------------------------------- rank jobs
def job_agreement(rank: int, arg: Any) -> dict:
    """The spread outer loop, data-parallel hypergradients and a data-parallel outer step."""
    opt = outer_loop()
    opt.run()
    out: dict[str, Any] = {"spread": records(opt), "raw": opt.raw}
    problem = mlp_problem()
    for name, method in dp_methods().items():
        hg = hd.distributed.data_parallel(method)(problem)
        out[name] = (hg.vector, hg.value, hg.train_loss)
    dp_opt = outer_loop(hd.distributed.data_parallel("reverse"), samples=2, steps=1)
    dp_opt.run()
    out["dp_outer"] = records(dp_opt)
    return out


def run_settings(out: str) -> None:
    run_experiment(load_config(overrides=SETTINGS), out=out, log=lambda _: None, progress=False)


def job_killed_run(rank: int, out: str) -> str:
    """Run SETTINGS; rank 1 dies in the middle of an outer step; rank 0 reports it."""
    if rank == 1:
        calls = {"n": 0}
        train = HyperOptimizer._train

        def dying(self, problem, raw):
            calls["n"] += 1
            if calls["n"] > KILL_AT_TRAINING // WORLD:
                os._exit(3)
            return train(self, problem, raw)

        HyperOptimizer._train = dying  # type: ignore[method-assign]
    hd.distributed.current_group().stale_s = 1.0
    run_settings(out)
    return "finished"


def job_resume(rank: int, out: str) -> dict:
    return run_experiment(None, resume=out, log=lambda _: None, progress=False)


JOBS = {"agreement": job_agreement, "killed": job_killed_run, "resume": job_resume}


def worker(rank: int, port: int, job: str, arg: Any, results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=30))
    try:
        results.put((rank, "ok", JOBS[job](rank, arg)))
    except BaseException as err:
        results.put((rank, "error", f"{type(err).__name__}: {err}"))
        results.close()
        results.join_thread()
        os._exit(1)  # the group may be broken: do not wait on it
    hd.distributed.group.forget_groups()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(job: str, arg: Any = None, timeout: float = 60.0) -> tuple[dict, list]:
    """Start WORLD ranks of ``job``; their results by rank and exit codes (fail on a hang)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, job, arg, results), daemon=True)
             for r in range(WORLD)]
    for proc in procs:
        proc.start()
    out: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < WORLD and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=0.2)
                out[rank] = (status, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for proc in procs:
            proc.join(timeout=max(deadline - time.monotonic(), 0.1))
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    if hung:
        pytest.fail(f"{job}: ranks {hung} still running after {timeout:.0f} s (hung)")
    return out, [p.exitcode for p in procs]


def close(a: Any, b: Any, tol: float) -> bool:
    """Nested dicts / lists / floats / tensors equal up to ``tol`` (absolute)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return bool((a - b).abs().max() <= tol) if a.numel() else True
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol or a == b
    return a == b


# ---------------------------------------------------------------------- tests
def test_two_ranks_equal_one_process():
    results, codes = launch("agreement")
    assert codes == [0, 0], results
    ranks = [results[r][1] for r in range(WORLD)]
    reference = outer_loop()
    reference.run()
    for got in ranks:  # the spread outer loop: 3 samples over 2 ranks, warm starts, selection
        assert close(got["spread"], records(reference), 1e-12)
        assert close(got["raw"], reference.raw, 1e-12)
    problem = mlp_problem()
    for name, method in dp_methods().items():  # data-parallel == single-process full batch
        hg = method(problem)
        for got in ranks:
            vector, value, train_loss = got[name]
            assert (vector - hg.vector).abs().max() <= 1e-10, name
            assert abs(value - hg.value) <= 1e-10 and abs(train_loss - hg.train_loss) <= 1e-10
        assert float(hg.vector.abs().min()) > 1e-6  # a real hypergradient, not zeros
    fd = hd.finite_difference(1e-5)(problem)  # and the reference itself is right
    assert (fd.vector - dp_methods()["reverse"](problem).vector).abs().max() < 1e-6
    reference_dp = outer_loop(samples=2, steps=1)
    reference_dp.run()
    for got in ranks:
        assert close(got["dp_outer"], records(reference_dp), 1e-10)


def test_lost_rank_ends_the_run_and_the_last_checkpoint_resumes(tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    results, codes = launch("killed", str(out))
    assert codes[1] == 3 and 1 not in results  # rank 1 died inside a step
    status, message = results[0]
    assert status == "error" and "LostRankError" in message, message
    assert "rank 1 is lost" in message and "outer step 2" in message, message
    assert time.monotonic() - started < 30
    assert len(RunDir(out).read_history()) == 2  # steps 0 and 1 were checkpointed

    results, codes = launch("resume", str(out))
    assert codes == [0, 0], results
    reference_dir = tmp_path / "reference"
    run_settings(str(reference_dir))  # uninterrupted, in one process
    got = [r.without_timing() for r in RunDir(out).read_history()]
    want = [r.without_timing() for r in RunDir(reference_dir).read_history()]
    assert len(got) == 4 and close(got, want, 1e-12)
    assert results[0][1]["tuned"]["hparams"] == results[1][1]["tuned"]["hparams"]


def test_data_parallel_refuses_what_it_cannot_do():
    with pytest.raises(hd.HyperdiffError, match="data_parallel: method must be one of"):
        hd.distributed.data_parallel("implicit")
    with pytest.raises(hd.HyperdiffError, match="engine must be"):
        hd.distributed.data_parallel(hd.forward(engine="jvp"))
    problem = mlp_problem()  # one process: the method runs unchanged
    dp = hd.distributed.data_parallel("reverse")(problem)
    assert torch.equal(dp.vector, hd.reverse()(problem).vector)
    shard = ShardedBatches(problem.train_data, 0, 3)
    with pytest.raises(hd.HyperdiffError, match="split evenly over 3 ranks"):
        shard.batch(0, 0)
