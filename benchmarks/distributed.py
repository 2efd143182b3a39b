"""Throughput on torch.distributed (gloo, CPU): 1 rank against 2 ranks, side by side.

0. A control without hyperdiff or communication: the same 4 plain trainings, split over 2
   processes; its speed-up is what the (shared) machine gives two processes at the moment.
1. Outer steps of ``mlp_digits`` with 4 samples per step, gradient steps (``explore=0``: no
   global phase, whose points are plain trainings): with 2 ranks each rank runs 2 of the 4
   trainings (:mod:`hyperdiff.tuner.distributed.spread`). Target: >= 1.7x steps per second.
2. The data-parallel inner step (:mod:`hyperdiff.tuner.distributed.data_parallel`) of a model large
   enough for compute to dominate (an MLP 256-1024-1024-10, batch 1024, float32): reverse-mode
   hypergradient time per inner step, one process on the full batch against 2 ranks on halves.

Every configuration runs in fresh processes with one torch thread each, alternating 1-rank
and 2-rank runs ``--repeats`` times; the best time of each is kept. Besides wall time the
script reports the CPU ratio (CPU seconds of one process over those of rank 0 of two): on a
machine shared with other jobs, wall-time speed-ups swing with the load, while the CPU ratio
shows how the work splits (it is the speed-up on two idle cores when waiting is negligible). The NCCL path (GPUs) is not
measured here: this machine has none.

    python benchmarks/distributed.py [--repeats 3] [--inner-steps 50] [--outer-steps 4]

prints a table and writes ``benchmarks/results/distributed.json`` (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).parent / "results" / "distributed.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job: str, options: dict, results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=120))
    value = {**JOBS, **EXTRA_JOBS}[job](options)
    results.put((rank, value))
    if world > 1:
        import hyperdiff.tuner.distributed.group as group

        group.forget_groups()
        torch.distributed.destroy_process_group()


def run_ranks(world: int, job: str, options: dict, timeout: float = 600.0) -> Any:
    """Rank 0's result of ``job`` on ``world`` fresh processes (spawned)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, options, results))
             for r in range(world)]
    for proc in procs:
        proc.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(out) < world and time.monotonic() < deadline:
        try:
            rank, value = results.get(timeout=1.0)
            out[rank] = value
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    if 0 not in out:
        raise RuntimeError(f"{job} on {world} ranks failed (exit codes "
                           f"{[p.exitcode for p in procs]})")
    return out[0]


# ---------------------------------------------------------------------- jobs
def outer_steps(options: dict) -> dict:
    """Seconds per outer step of mlp_digits with 4 samples (after one warm-up step)."""
    from hyperdiff.app.tasks import build_task
    from hyperdiff.tuner.driver import HyperOptimizer, Stopping
    from hyperdiff.tuner.offline_plan import OfflinePlan

    task = build_task("mlp_digits", steps=options["inner_steps"])
    # no global phase: mlp_digits starts weak, and the phase's points (steps 1..8) are plain
    # trainings without a hypergradient
    opt = HyperOptimizer(list(task.problems), lr=0.05, plan=OfflinePlan(samples=4, explore=0),
                         stopping=Stopping(max_steps=options["outer_steps"] + 1))
    opt.step()
    started, cpu = time.perf_counter(), time.process_time()
    opt.run()
    steps = options["outer_steps"]
    return {"step_s": (time.perf_counter() - started) / steps,
            "cpu_s": (time.process_time() - cpu) / steps, "val_loss": opt.history[-1].val_loss}


def big_problem(batch: int):
    import hyperdiff as hd

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 256, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    sizes = [(256, 1024), (1024, 1024), (1024, 10)]
    params = {f"w{i}": torch.randn(a, b, generator=gen) / a**0.5 for i, (a, b) in
              enumerate(sizes)}

    def logits(p, xb):
        h = torch.tanh(xb @ p["w0"])
        h = torch.tanh(h @ p["w1"])
        return h @ p["w2"]

    def train_loss(p, h, b):
        l2 = sum((v**2).sum() for v in p.values())
        return torch.nn.functional.cross_entropy(logits(p, b[0]), b[1]) + 0.5 * h["wd"] * l2

    def val_loss(p, h, b):
        return torch.nn.functional.cross_entropy(logits(p, b[0]), b[1])

    hparams = hd.HyperParameters(lr=hd.scalar(0.1), wd=hd.scalar(1e-4))
    return hd.make_problem(train_loss, val_loss, hparams, params,
                           optimizer=hd.sgd(lr="lr", momentum=0.9), train_data=(x, y),
                           val_data=(x[:256], y[:256]), steps=4, probe=False)


def data_parallel_step(options: dict) -> dict:
    """Seconds per inner step of a reverse hypergradient (best of 3 after a warm-up)."""
    import hyperdiff as hd

    problem = big_problem(options["batch"])
    method = hd.distributed.data_parallel(hd.reverse())
    method(problem)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(3):
        started, cpu = time.perf_counter(), time.process_time()
        hg = method(problem)
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return {"inner_step_s": best / problem.steps, "cpu_s": best_cpu / problem.steps,
            "value": hg.value, "grad": hg.vector.tolist()}


def control(options: dict) -> dict:
    """The same compute as ``outer``'s trainings without hyperdiff or communication: the
    4 samples' plain trainings split over the ranks (what the machine gives two processes)."""
    from hyperdiff.app.tasks import build_task
    from hyperdiff.engine.training import train

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    problem = build_task("mlp_digits", steps=options["inner_steps"]).problems[0]
    train(problem)
    rounds = 3 * options["outer_steps"]  # plain training is ~3x cheaper than a hypergradient
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        for _sample in range(rank, 4, world):
            train(problem)
    return {"step_s": (time.perf_counter() - started) / rounds,
            "cpu_s": (time.process_time() - cpu) / rounds}


def all_reduce_time(options: dict) -> dict:
    """Seconds of one gloo all-reduce of the data-parallel model's gradient (best of 10)."""
    numel = sum(int(p.numel()) for p in big_problem(8).params.values())
    x = torch.randn(numel)
    for _ in range(3):
        torch.distributed.all_reduce(x)
    best = float("inf")
    for _ in range(10):
        started = time.perf_counter()
        torch.distributed.all_reduce(x)
        best = min(best, time.perf_counter() - started)
    return {"all_reduce_s": best, "megabytes": numel * 4 / 1e6}


JOBS = {"outer": outer_steps, "data_parallel": data_parallel_step, "control": control}
EXTRA_JOBS = {"all_reduce": all_reduce_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--outer-steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=OUT, help=f"result file (default: {OUT})")
    args = parser.parse_args()
    out = args.out
    outer_opts = {"inner_steps": args.inner_steps, "outer_steps": args.outer_steps}
    dp_opts = {"batch": args.batch}
    load_before = os.getloadavg()
    runs: dict[str, dict[int, list[dict]]] = {job: {1: [], 2: []} for job in JOBS}
    for _ in range(args.repeats):
        for world in (1, 2):
            runs["control"][world].append(run_ranks(world, "control", outer_opts))
            runs["outer"][world].append(run_ranks(world, "outer", outer_opts))
            runs["data_parallel"][world].append(run_ranks(world, "data_parallel", dp_opts))
    reduce = run_ranks(2, "all_reduce", {})
    outer = {w: min(r["step_s"] for r in rs) for w, rs in runs["outer"].items()}
    plain = {w: min(r["step_s"] for r in rs) for w, rs in runs["control"].items()}
    cpu = {job: {w: min(r["cpu_s"] for r in rs) for w, rs in runs[job].items()} for job in JOBS}
    cpu_ratio = {job: cpu[job][1] / cpu[job][2] for job in JOBS}
    inner = {w: min(r["inner_step_s"] for r in rs) for w, rs in runs["data_parallel"].items()}
    same_loss = runs["outer"][1][0]["val_loss"] == runs["outer"][2][0]["val_loss"]
    g1 = torch.tensor(runs["data_parallel"][1][0]["grad"])
    g2 = torch.tensor(runs["data_parallel"][2][0]["grad"])
    dp_rel = float((g1 - g2).norm() / g1.norm())
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                    "note": "shared with other agents while measured: speed-ups are depressed "
                            "and noisy"},
        "outer_step": {"task": "mlp_digits", "samples": 4, "inner_steps": args.inner_steps,
                       "seconds_per_step": {"1_rank": outer[1], "2_ranks": outer[2]},
                       "speedup": outer[1] / outer[2], "target": 1.7,
                       "same_history_value": same_loss},
        "control_plain_trainings_no_communication": {
            "seconds_per_step": {"1_process": plain[1], "2_processes": plain[2]},
            "speedup": plain[1] / plain[2],
            "meaning": "the parallelism the machine gave two processes during this run"},
        "data_parallel_inner_step": {
            "model": "MLP 256-1024-1024-10 float32, reverse hypergradient, T=4",
            "batch": args.batch,
            "seconds_per_inner_step": {"1_rank_full_batch": inner[1], "2_ranks_half_each": inner[2]},
            "speedup": inner[1] / inner[2], "relative_grad_difference_float32": dp_rel,
            "gradient_all_reduce_2_ranks": reduce},
        "cpu_seconds_per_step_rank0": cpu,
        "cpu_ratio_1_over_2_ranks": cpu_ratio,
        "cpu_ratio_meaning": "CPU seconds of one process / of rank 0 of two: the speed-up on "
                             "two idle cores if waiting is negligible; robust to the load",
        "nccl": "unmeasured: no GPU in this session",
        "repeats": args.repeats, "all_runs": runs,
        "command": "python benchmarks/distributed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in result["all_runs"]["data_parallel"].values():
        for run in r:
            run.pop("grad")
    out.write_text(json.dumps(result, indent=1))
    print(f"{'wall seconds (best of repeats)':34}{'1 rank':>10}{'2 ranks':>10}{'speed-up':>10}"
          f"{'CPU ratio':>11}")
    rows = [("control: 4 plain trainings", plain, "control"),
            ("outer step, 4 samples", outer, "outer"),
            ("data-parallel inner step", inner, "data_parallel")]
    for label, wall, job in rows:
        print(f"{label:34}{wall[1]:>10.4f}{wall[2]:>10.4f}{wall[1] / wall[2]:>9.2f}x"
              f"{cpu_ratio[job]:>10.2f}x")
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
          f"(the machine is shared: speed-ups are depressed); same val loss 1 vs 2 ranks: "
          f"{same_loss}; data-parallel grad rel. diff (float32): {dp_rel:.1e}; one all-reduce "
          f"of its {reduce['megabytes']:.1f} MB gradient: {1e3 * reduce['all_reduce_s']:.1f} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
