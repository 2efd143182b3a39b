"""How soon a stopped (SIGSTOP) rank is named, at the default ``distributed.timeout_s`` (300 s).

Each trial forks 2 gloo ranks on 127.0.0.1 that run ``hyperdiff``'s ``run_experiment`` on
``mlp_digits`` (spread: 2 samples per outer step; or data-parallel), waits until rank 0
has finished its first outer step and then a random 0-1 s more (a few steps), stops rank 1 with SIGSTOP (so it may be computing, at a barrier, or inside a
collective) and times rank 0 until it raises its :class:`~hyperdiff.tuner.distributed.LostRankError`;
then rank 1 is killed. The documented bound is ``STALE_S + HEARTBEAT_S`` (3.5 s) plus the
load's delays.

    python benchmarks/lost_rank.py [--trials 6]

prints a table and writes ``benchmarks/results/lost_rank.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import signal
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.tuner.distributed import LostRankError

OUT = Path(__file__).parent / "results" / "lost_rank.json"
TIMEOUT_S = 300.0
SETTINGS = ["task.name=mlp_digits", "inner.steps=8", "outer.samples=2", "stop.max_steps=1000",
            "report.seeds=1", f"distributed.timeout_s={TIMEOUT_S}"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_main(rank: int, port: int, mode: str, out: str, results: Any) -> None:
    """One rank: run until a LostRankError, report its time and message, exit at once."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=TIMEOUT_S))
    extra = ["distributed.data_parallel=true"] if mode == "data-parallel" else []
    try:
        run_experiment(load_config(overrides=[*SETTINGS, *extra]), out=out,
                       log=lambda _: None, progress=False,
                       callbacks=[lambda _opt, _record: results.put((rank, "step", 0))])
    except LostRankError as err:
        results.put((rank, "lost", (time.time(), str(err))))
    results.close()
    results.join_thread()
    os._exit(1)


def trial(mode: str, delay: float) -> dict[str, Any]:
    """Stop rank 1 ``delay`` s after rank 0's first outer step; rank 0's detection time and
    message."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=rank_main, args=(r, port, mode, f"{tmp}/run", results),
                             daemon=True) for r in range(2)]
        for proc in procs:
            proc.start()
        try:
            got: dict[tuple[int, str], Any] = {}
            while (0, "step") not in got:
                rank, tag, value = results.get(timeout=60)
                got[rank, tag] = value
            time.sleep(delay)
            stopped = time.time()
            os.kill(procs[1].pid, signal.SIGSTOP)
            while (0, "lost") not in got:
                try:
                    rank, tag, value = results.get(timeout=TIMEOUT_S + 30)
                except queue.Empty:
                    return {"mode": mode, "delay_s": delay, "detected_s": None}
                got[rank, tag] = value
        finally:
            for proc in procs:
                proc.kill()
                proc.join()
    seen, message = got[0, "lost"]
    return {"mode": mode, "delay_s": round(delay, 2), "detected_s": round(seen - stopped, 2),
            "message": message}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args()
    rng = random.Random(0)
    rows = []
    load_before = os.getloadavg()[0]
    for mode in ("spread", "data-parallel"):
        for _ in range(args.trials):
            row = trial(mode, rng.uniform(0.0, 1.0))
            rows.append(row)
            where = row.get("message", "no error").split(": rank")[0]
            print(f"{mode:14s} stopped {row['delay_s']:.2f} s after step 0: named after "
                  f"{row['detected_s']} s ({where})", flush=True)
    summary = {}
    for mode in ("spread", "data-parallel"):
        times = [r["detected_s"] for r in rows if r["mode"] == mode]
        done = [t for t in times if t is not None]
        summary[mode] = {"trials": len(times), "missed": len(times) - len(done),
                         "min_s": min(done), "median_s": statistics.median(done),
                         "max_s": max(done)}
        print(f"{mode:14s} {summary[mode]}")
    OUT.write_text(json.dumps({
        "timeout_s": TIMEOUT_S, "summary": summary, "trials": rows,
        "load_average": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
