"""What an online run costs over one plain training as the run gets longer.

The suite's tasks train 60-150 steps (a plain training of 0.03-0.7 s on this machine), where a
window's fixed costs (the learning-rate derivatives, the last step's exact backward pass, the
validation gradient, the outer step, the record) weigh more than in a run of thousands of
steps. For each task and each run length (``--factors`` x the task's own ``steps``), in one
process: one plain training at the start's values and the default online run of the same
length (``outer.mode = "online"``, nothing else set, in memory: no run directory), interleaved
``--repeats`` times; the ratio of the medians of wall and CPU time, the windows the run took,
and its own final model's test loss beside the plain training's.

    OMP_NUM_THREADS=1 python benchmarks/online_cost_length.py \
        --out benchmarks/results/online_cost_length.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suite_tasks"))

from suite import SEEDS, TASK_DIR, TASKS  # noqa: E402

import hyperdiff as hd  # noqa: E402
from hyperdiff.app.config import load_config  # noqa: E402
from hyperdiff.app.plans import build_online  # noqa: E402
from hyperdiff.app.tasks.base import trained_params  # noqa: E402


def timed(run: Any) -> tuple[float, float, Any]:
    """``run()``'s wall and CPU seconds and its result."""
    started, started_cpu = time.perf_counter(), time.process_time()
    out = run()
    return time.perf_counter() - started, time.process_time() - started_cpu, out


def measure(name: str, steps: int, repeats: int) -> dict[str, Any]:
    """Plain training and online run of ``steps`` steps on task ``name``, interleaved."""
    ref = f"{TASK_DIR / name}.py:build"
    task = hd.tasks.build_task(ref, steps=steps)
    config = load_config(overrides=[f"task.name={ref}", "outer.mode=online",
                                    f"inner.steps={steps}"])
    plain_wall, plain_cpu, online_wall, online_cpu = [], [], [], []
    result = loop = params = None
    for _ in range(repeats):
        wall, cpu, params = timed(lambda: trained_params(task.final_problem, task.hparams.raw,
                                                         seed=SEEDS[0]))
        plain_wall.append(wall)
        plain_cpu.append(cpu)
        online_task, loop = build_online(config)
        wall, cpu, result = timed(loop.run)
        online_wall.append(wall)
        online_cpu.append(cpu)
    assert result is not None and params is not None
    hview = online_task.hparams.view(online_task.final_problem.raw_tensors(result.final_raw))
    own = online_task.metrics_at(result.params, result.buffers, hview)["test"]["loss"]
    plain = task.metrics_at(*params)["test"]["loss"]
    row = {"task": name, "steps": steps, "windows": result.hyper_steps,
           "plain_wall_s": statistics.median(plain_wall),
           "plain_cpu_s": statistics.median(plain_cpu),
           "online_wall_s": statistics.median(online_wall),
           "online_cpu_s": statistics.median(online_cpu),
           "own_model_test_loss": own, "plain_test_loss": plain}
    row["wall_ratio"] = row["online_wall_s"] / row["plain_wall_s"]
    row["cpu_ratio"] = row["online_cpu_s"] / row["plain_cpu_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--factors", nargs="+", type=float, default=[1.0, 3.0, 10.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "online_cost_length.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| task | steps | windows | plain s (CPU) | online / plain, wall | online / plain, CPU "
          "| own model test loss | plain test loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.tasks:
        base = hd.tasks.build_task(f"{TASK_DIR / name}.py:build").final_problem.steps
        for factor in args.factors:
            r = measure(name, max(1, round(base * factor)), args.repeats)
            rows.append(r)
            print(f"| {name} | {r['steps']} | {r['windows']} | {r['plain_cpu_s']:.2f} | "
                  f"{r['wall_ratio']:.2f} | {r['cpu_ratio']:.2f} | "
                  f"{r['own_model_test_loss']:.4f} | {r['plain_test_loss']:.4f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "repeats": args.repeats,
                                    "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
