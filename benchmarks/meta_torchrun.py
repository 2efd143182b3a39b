"""A meta run in one process against the same run under ``torchrun --nproc_per_node 2``.

``hyperdiff run --task sinusoid_maml --set outer.mode=meta`` (a short budget: ``--steps`` outer
steps of ``--batch`` tasks, ``--val-tasks`` fixed validation tasks) once as one process and
once as 2 gloo ranks on this machine, ``--repeats`` times in alternating order, each process
with one thread (``OMP_NUM_THREADS=1``). Rank ``r`` adapts tasks ``i`` with ``i % 2 == r``,
so the 2-rank run should approach half the time of the loop when the machine has 2 free
cores; its start (torchrun, a second interpreter, the process group) and the per-step gather
come on top. Reported: the best wall time of the whole command, the best outer-loop time
(``result.json``'s ``time_s``: the loop alone, without start-up and report), the CPU time of
every process of the command together, and whether the
2-rank history equals the one-process history (largest difference over every number of every
record). The machine is shared and noisy.

    python benchmarks/meta_torchrun.py

Writes benchmarks/results/meta_torchrun.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(ranks: int, out: Path, args: argparse.Namespace) -> list[str]:
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc_per_node",
                                      str(ranks), "--master_addr", "127.0.0.1",
                                      "--master_port", str(free_port())]
    return [sys.executable, *launcher, "-m", "hyperdiff", "run", "--task", "sinusoid_maml",
            "--quiet", "--out", str(out), "--set", "outer.mode=meta",
            "--set", f"outer.meta_batch={args.batch}", "--set", f"stop.max_steps={args.steps}",
            "--set", f"outer.meta_val_tasks={args.val_tasks}",
            "--set", f"outer.meta_test_tasks={args.test_tasks}", "--set", "report.seeds=1"]


def children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (all ranks, torchrun)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def numbers(value: Any) -> list[float]:
    """Every number in a record, in order."""
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in numbers(value[k])]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else []


def history(out: Path) -> list[float]:
    skip = {"time_s", "step_time_s"}
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return numbers([{k: v for k, v in r.items() if k not in skip} for r in records])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--val-tasks", type=int, default=8)
    parser.add_argument("--test-tasks", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/meta_torchrun.json")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wall: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    loop: dict[int, list[float]] = {1: [], 2: []}
    diffs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            outs = {}
            for ranks in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                outs[ranks] = Path(tmp) / f"r{round_}-{ranks}"
                start, used = time.perf_counter(), children_cpu()
                done = subprocess.run(command(ranks, outs[ranks], args), env=env,
                                      capture_output=True, text=True, timeout=600)
                wall[ranks].append(time.perf_counter() - start)
                cpu[ranks].append(children_cpu() - used)
                if done.returncode != 0:
                    sys.exit(f"{ranks} rank(s) failed:\n{done.stdout}\n{done.stderr}")
                result = json.loads((outs[ranks] / "result.json").read_text())
                loop[ranks].append(float(result["time_s"]))
            one, two = history(outs[1]), history(outs[2])
            diffs.append(max(abs(a - b) for a, b in zip(one, two, strict=True))
                         if len(one) == len(two) else float("inf"))
    rows = [{"ranks": r, "wall_s": min(wall[r]), "loop_s": min(loop[r]),
             "cpu_s": min(cpu[r]), "cpu_vs_one": min(cpu[r]) / min(cpu[1]),
             "wall_vs_one": min(wall[r]) / min(wall[1]),
             "loop_vs_one": min(loop[r]) / min(loop[1])} for r in (1, 2)]
    print(f"sinusoid_maml meta, {args.steps} outer steps x {args.batch} tasks, "
          f"{args.val_tasks} validation tasks, {args.test_tasks} held-out tasks, best of "
          f"{args.repeats} (1 thread per rank, shared 2-core machine: noisy)")
    print(f"{'ranks':>5}{'command s':>11}{'x one':>7}{'loop s':>9}{'x one':>7}"
          f"{'CPU s (all)':>13}{'x one':>7}")
    for row in rows:
        print(f"{row['ranks']:>5}{row['wall_s']:>11.2f}{row['wall_vs_one']:>7.2f}"
              f"{row['loop_s']:>9.2f}{row['loop_vs_one']:>7.2f}"
              f"{row['cpu_s']:>13.2f}{row['cpu_vs_one']:>7.2f}")
    print(f"largest |2 ranks - 1 process| over the histories: {max(diffs):.3g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"},
                               "rows": rows, "wall_s": wall, "loop_s": loop, "cpu_s": cpu,
                               "max_history_diff": max(diffs)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
