"""Problems and rank jobs of tests/test_distributed.py, in a module of their own so that the
ranks, forked from a server that imported it once, start in milliseconds."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.tuner.distributed.data_parallel import rank_seed
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.offline_plan import OfflinePlan
from hyperdiff.tuner.sampler import Sampler

WORLD = 2
STEPS = 6
SETTINGS = ["task.name=mlp_digits", "inner.steps=8", "inner.warm_start=true",
            "outer.samples=2", "stop.max_steps=4", "report.seeds=1"]
KILL_AT_TRAINING = 5  # rank 1 dies inside outer step 2 (trainings 4, 5 are that step's)
Report = Callable[[str, Any], None]


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


def dropout_problem(emulate_ranks: bool = False) -> hd.Problem:
    """A float64 MLP with dropout. With ``emulate_ranks`` one process computes what
    data-parallel ranks do: the mean over shards ``r`` of the loss with rank ``r``'s dropout
    seed (the single-process oracle of data-parallel dropout)."""
    torch.manual_seed(0)
    net = hd.functional(torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.3),
        torch.nn.Linear(8, 1)).double())
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))

    def shard_loss(p, h, batch, ctx):
        xb, yb = batch
        l2 = sum((v**2).sum() for v in p.values())
        return ((net(p, xb, ctx) - yb) ** 2).mean() + 0.5 * h["wd"] * l2

    def train_loss(p, h, batch, ctx):
        if not emulate_ranks:
            return shard_loss(p, h, batch, ctx)
        seed, size, parts = ctx.seed, batch[0].shape[0] // WORLD, []
        for r in range(WORLD):
            ctx.seed, ctx.calls = rank_seed(seed, r), 0
            rows = slice(r * size, (r + 1) * size)
            parts.append(shard_loss(p, h, (batch[0][rows], batch[1][rows]), ctx))
        ctx.seed = seed
        return sum(parts) / WORLD

    def val_loss(p, h, batch, ctx):
        return ((net(p, batch[0], ctx) - batch[1]) ** 2).mean()

    hparams = hd.HyperParameters(lr=hd.scalar(0.1), wd=hd.scalar(1e-2))
    return hd.make_problem(train_loss, val_loss, hparams, net.params,
                           optimizer=hd.sgd(lr="lr", momentum=0.9),
                           train_data=hd.minibatches(x, y, batch_size=8),
                           val_data=(x, y), steps=STEPS, seed=3, probe=False)


def diverging_loop() -> HyperOptimizer:
    """Sample 1 of outer step 1 (seed 4, on rank 1 of 2) diverges: the guard rejects that
    step on every rank, and the loop goes on."""
    problem = mlp_problem()
    base = problem.train_loss

    def train_loss(p, h, batch, ctx):
        value = base(p, h, batch)
        return value * float("nan") if ctx.seed == 4 else value

    problem = replace(problem, train_loss=train_loss, train_takes_ctx=True)
    return HyperOptimizer(problem, samples=3, stopping=Stopping(max_steps=4))


def run_to_failure(opt: HyperOptimizer) -> tuple[str, list[dict]]:
    try:
        opt.run()
    except hd.NonFiniteError as err:
        return str(err), records(opt)
    return "no failure", records(opt)


def selection_split() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    return xs, torch.sin(xs.sum(1, keepdim=True))


def outer_loop(method: Any = "reverse", samples: int = 3, steps: int = 2) -> HyperOptimizer:
    return HyperOptimizer(mlp_problem(), method=method, samples=samples, lr=0.1,
                          warm_start=True, selection=selection_split(),
                          stopping=Stopping(max_steps=steps))


def revert_loop() -> HyperOptimizer:
    """3 samples on common seeds with an outer rate that overshoots: goes back twice in 6 steps."""
    plan = OfflinePlan(samples=3, revert=1, common_seed=True, explore=0)
    return HyperOptimizer(mlp_problem(), plan=plan, lr=0.5, selection=selection_split(),
                          stopping=Stopping(max_steps=6, patience=None))


def dp_methods() -> dict[str, hd.methods.Method]:
    return {"reverse": hd.reverse(), "forward": hd.forward(),
            "checkpointed": hd.checkpointed(segments=2), "truncated": hd.truncated(3),
            "truncated head": hd.truncated(3, head="curvature"),
            "finite_difference": hd.finite_difference(warn=False),
            "curvature": hd.methods.curvature()}


def records(opt: HyperOptimizer) -> list[dict]:
    return [r.without_timing() for r in opt.history]


class Journal:
    """A stand-in for a run directory: appends lines, hands out an unpicklable lock."""

    def __init__(self, path: str):
        self.path = path

    def append(self, text: str) -> int:
        with open(self.path, "a") as handle:
            handle.write(f"{text} by {os.getpid()}\n")
        return os.getpid()

    def lock(self) -> JournalLock:
        return JournalLock(self)


class JournalLock:
    def __init__(self, journal: Journal):
        self.journal, self.mutex = journal, threading.Lock()  # a lock cannot be pickled

    def __enter__(self) -> JournalLock:
        self.mutex.acquire()
        self.journal.append("locked")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.journal.append("unlocked")
        self.mutex.release()

    def owner(self) -> int:
        return os.getpid()


# ---------------------------------------------------------------------- rank jobs
def root_calls(out: str, report: Report) -> None:
    journal = hd.distributed.root_only(lambda: Journal(out + ".journal"))
    writer = journal.append("hello")
    with journal.lock() as held:
        owner = held.owner()
    report("root_calls", (os.getpid(), writer, owner, journal.path))


def agreement(report: Report) -> None:
    """The spread outer loop, data-parallel hypergradients and a data-parallel outer step."""
    opt = outer_loop()
    opt.run()
    report("spread", (records(opt), opt.raw))
    opt = revert_loop()
    opt.run()
    report("revert", (records(opt), opt.raw))
    problem = mlp_problem()
    for name, method in dp_methods().items():
        hg = hd.distributed.data_parallel(method)(problem)
        report(name, (hg.vector, hg.value, hg.train_loss))
    dp_opt = outer_loop(hd.distributed.data_parallel("reverse"), samples=2, steps=1)
    dp_opt.run()
    report("dp_outer", records(dp_opt))
    hg = hd.distributed.data_parallel("reverse")(dropout_problem())
    report("dropout", (hg.vector, hg.value))
    report("diverging", run_to_failure(diverging_loop()))


def run_settings(out: str) -> dict:
    return run_experiment(load_config(overrides=SETTINGS), out=out, log=lambda _: None,
                          progress=False)


def killed_run(rank: int, out: str) -> None:
    """Run SETTINGS; rank 1 dies in the middle of outer step 2; rank 0 must say so."""
    if rank == 1:
        calls = {"n": 0}
        train = Sampler._train

        def dying(self, problem, raw, *plain):
            calls["n"] += 1
            if calls["n"] > KILL_AT_TRAINING // WORLD:
                os._exit(3)
            return train(self, problem, raw, *plain)

        Sampler._train = dying  # type: ignore[method-assign]
    group = hd.distributed.current_group()
    assert group is not None
    group.stale_s = 1.0
    run_settings(out)


def job_first(rank: int, out: str, report: Report) -> None:
    agreement(report)
    root_calls(out, report)
    killed_run(rank, out)


def job_resume(rank: int, out: str, report: Report) -> None:
    """Resume the killed run; then rank 1 hangs (alive) at a barrier that rank 0 waits at."""
    report("result", run_experiment(None, resume=out, log=lambda _: None, progress=False))
    group = hd.distributed.current_group()
    assert group is not None
    group.timeout_s = 1.0
    if rank == 1:
        time.sleep(2.0)
    else:
        group.barrier("hang probe")


def job_dp_death(rank: int, out: str, report: Report) -> None:
    """Rank 1 dies inside a data-parallel training (its 4th train loss)."""
    group = hd.distributed.current_group()
    assert group is not None
    group.stale_s = 1.0
    problem = mlp_problem()
    if rank == 1:
        problem = at_fourth_train_loss(problem, lambda: os._exit(3))
    hd.distributed.data_parallel("reverse")(problem)


def at_fourth_train_loss(problem: hd.Problem, action: Callable[[], Any]) -> hd.Problem:
    """``problem`` whose train loss calls ``action()`` at its 4th call."""
    base, calls = problem.train_loss, {"n": 0}

    def train_loss(p, h, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            action()
        return base(p, h, batch)

    return replace(problem, train_loss=train_loss)


def stop_myself(report: Report) -> None:
    """Report the time, then SIGSTOP this process (alive, silent: every thread stops)."""
    report("stopped at", time.time())
    time.sleep(0.3)  # the queue's feeder thread sends the report first
    os.kill(os.getpid(), signal.SIGSTOP)


def lost_at(report: Report, fn: Callable[[], Any]) -> None:
    """``fn()``; report the time and message of the :class:`LostRankError` it raises."""
    try:
        fn()
    except hd.distributed.LostRankError as err:
        report("lost", (time.time(), str(err)))
        raise


def job_stopped_in_gather(rank: int, out: str, report: Report) -> None:
    """Rank 1 arrives at a gather's barrier and stops before the gather itself: rank 0 waits
    inside the backend's all-gather (timeout_s = 300 s)."""
    group = hd.distributed.current_group(timeout_s=300.0)
    assert group is not None
    if rank == 1:
        group.barrier("outer step 0 (spread)")
        stop_myself(report)
    lost_at(report, lambda: group.all_gather("outer step 0 (spread)", rank))


def job_stopped_in_dp_training(rank: int, out: str, report: Report) -> None:
    """Rank 1 stops inside a data-parallel training (its 4th train loss), so rank 0 waits
    in an all-reduce (timeout_s = 300 s)."""
    group = hd.distributed.current_group(timeout_s=300.0)
    assert group is not None
    problem = mlp_problem()
    if rank == 1:
        problem = at_fourth_train_loss(problem, lambda: stop_myself(report))
    lost_at(report, lambda: hd.distributed.data_parallel("reverse")(problem))


JOBS = {"first": job_first, "resume": job_resume, "dp_death": job_dp_death,
        "stopped_in_gather": job_stopped_in_gather,
        "stopped_in_dp_training": job_stopped_in_dp_training}


def worker(rank: int, port: int, job: str, arg: Any, results: Any, timeout_s: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=timeout_s))

    def report(tag: str, value: Any) -> None:
        results.put((rank, tag, value))

    try:
        JOBS[job](rank, arg, report)
    except BaseException as err:
        report("error", f"{type(err).__name__}: {err}")
        results.close()
        results.join_thread()
        os._exit(1)  # the group may be broken: do not wait on it
    hd.distributed.group.forget_groups()
    torch.distributed.destroy_process_group()
    results.close()
    results.join_thread()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(job: str, arg: Any = None, timeout: float = 60.0, *, until: int | None = None,
           group_timeout_s: float = 30.0
           ) -> tuple[dict[tuple[int, str], Any], list[int | None], list[int]]:
    """Run WORLD ranks of ``job`` (process group timeout ``group_timeout_s``): their reports
    by (rank, tag), their exit codes, and the ranks still running after ``timeout``, or once
    rank ``until`` has ended (killed)."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, job, arg, results, group_timeout_s),
                         daemon=True) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    out: dict[tuple[int, str], Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                rank, tag, value = results.get(timeout=0.1)
                out[rank, tag] = value
            except queue.Empty:
                waited = procs if until is None else [procs[until]]
                if all(not p.is_alive() for p in waited):
                    break
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
    return out, [p.exitcode for p in procs], hung


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
