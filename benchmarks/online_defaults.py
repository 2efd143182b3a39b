"""Online tuning against learning-rate-free optimizers, per task and online configuration.

For each task of the suite (``benchmarks/suite_tasks/``) and each online configuration (config
overrides, e.g. the default reverse windows of 10 or ``method.name=curvature``): one online
run from the task's start (and from starts ``--starts`` off), the run's own final model scored
on the test split (no retraining), and its wall time over one plain training of the same T
steps timed in the same process (best of 2, before and after the task), both in wall time and
in CPU time of this process (with ``OMP_NUM_THREADS=1`` one core: far less sensitive than wall
time to other jobs on a shared machine). Prodigy, schedule-free
AdamW and D-Adaptation Adam run on the same steps and minibatches beside it (``suite.py``'s
rows, mean over its 3 seeds).

    OMP_NUM_THREADS=1 python benchmarks/online_defaults.py --tasks tabular_mlp gru_seq \
        --configs "" "method.name=curvature" --out benchmarks/results/online_defaults.json

Times on a shared machine are noisy: the ratio uses the faster of the two plain timings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suite_tasks"))

from suite import LR_FREE, SEEDS, TASK_DIR, _load, _num, lr_free_row  # noqa: E402
from suite_common import start_name  # noqa: E402

import hyperdiff as hd  # noqa: E402
from hyperdiff.app.config import load_config  # noqa: E402
from hyperdiff.app.plans import build_online  # noqa: E402
from hyperdiff.app.tasks.base import trained_params  # noqa: E402

RESULTS = HERE / "results"


def plain_training(task: hd.Task, repeats: int = 2) -> tuple[float, float]:
    """Best wall and CPU seconds of ``repeats`` plain trainings (T steps at the start)."""
    wall, cpu = math.inf, math.inf
    for i in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        trained_params(task.final_problem, task.hparams.raw, seed=SEEDS[0] + i)
        wall = min(wall, time.perf_counter() - started)
        cpu = min(cpu, time.process_time() - started_cpu)
    return wall, cpu


def timed_online(ref: str, config: str, repeats: int = 1) -> tuple[Any, Any, Any, float, float]:
    """``(task, loop, result, wall, cpu)`` of the online run with the overrides ``config``
    (space-separated key=value), best times of ``repeats`` fresh runs; raises what the run
    raises."""
    overrides = [f"task.name={ref}", "outer.mode=online", *config.split()]
    wall, cpu = math.inf, math.inf
    for _ in range(repeats):
        task, loop = build_online(load_config(overrides=overrides))
        started, started_cpu = time.perf_counter(), time.process_time()
        result = loop.run()
        wall = min(wall, time.perf_counter() - started)
        cpu = min(cpu, time.process_time() - started_cpu)
    return task, loop, result, wall, cpu


def online_row(ref: str, config: str, plain_s: float) -> dict[str, Any]:
    """One online run with the overrides ``config`` (space-separated key=value); the run's own
    model's test metrics, its wall and CPU times (the ratio over ``plain_s``: set later)."""
    try:
        task, _, result, wall, cpu = timed_online(ref, config)
    except (hd.HyperdiffError, hd.NonFiniteError) as err:
        return {"config": config, "note": f"failed: {err}"}
    hview = task.hparams.view(task.final_problem.raw_tensors(result.final_raw))
    test = task.metrics_at(result.params, result.buffers, hview)["test"]
    return {"config": config, "test_loss": test["loss"], "test_accuracy": test.get("accuracy"),
            "time_s": wall, "cpu_s": cpu, "time_ratio": wall / plain_s,
            "windows": result.hyper_steps,
            "tuned": {k: float(v.float().mean()) for k, v in
                      result.final_hparams.natural().items()}}


def run_task(name: str, configs: list[str], starts: list[float], lr_free: bool = True
             ) -> dict[str, Any]:
    """Every configuration from every start on task ``name``, and the lr-free rows (unless
    ``lr_free`` is False)."""
    ref = f"{TASK_DIR / name}.py:build"
    task = hd.tasks.build_task(ref)
    plain_s, plain_cpu = plain_training(task)
    rows = []
    has_lr = getattr(_load(TASK_DIR / f"{name}.py"), "LR_NAME", None) is not None
    for factor in [1.0, *(starts if has_lr else [])]:  # no lr: no starts off
        started = ref if factor == 1.0 else f"{TASK_DIR / name}.py:{start_name(factor)}"
        for config in configs:
            r = online_row(started, config, plain_s)
            rows.append({"start": f"x{factor:g}", **r})
            print(f"{name} x{factor:g} [{config or 'default'}]: "
                  f"{_num(r.get('test_loss'), '.4f')}, CPU "
                  f"{_num(r.get('cpu_s', math.nan) / plain_cpu, '.2f')}x {r.get('note', '')}",
                  flush=True)
    others = [lr_free_row(task, optimizer, plain_s) for optimizer in LR_FREE] if lr_free else []
    again = plain_training(task)
    plain_s, plain_cpu = min(plain_s, again[0]), min(plain_cpu, again[1])
    for r in rows:
        if "time_s" in r:
            r["time_ratio"] = r["time_s"] / plain_s
            r["cpu_ratio"] = r["cpu_s"] / plain_cpu
    return {"task": name, "steps": task.final_problem.steps, "plain_training_s": plain_s,
            "plain_training_cpu_s": plain_cpu, "online": rows, "lr_free": others}


def best_lr_free(block: dict[str, Any]) -> tuple[float | None, str]:
    """The best lr-free test loss of ``block`` (None: none ran) and how the table's title
    names it: the loss and its optimizer, or why there is none."""
    ran = [r for r in block["lr_free"] if _finite(r.get("test_loss"))]
    if ran:
        best = min(ran, key=lambda r: r["test_loss"])
        return best["test_loss"], f"{best['test_loss']:.4f} ({best['method']})"
    return None, "- (" + ("all skipped" if block["lr_free"] else "none run") + ")"


def skipped_lines(block: dict[str, Any]) -> list[str]:
    """One line per lr-free row that did not run: its optimizer and the note why."""
    return [f"{r['method']}: skipped, {r['skipped']}" for r in block["lr_free"]
            if r.get("skipped")]


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def table(block: dict[str, Any]) -> str:
    """The task's rows as markdown: online own-model test loss and cost; lr-free losses (a
    skipped one with its note)."""
    best, named = best_lr_free(block)
    lines = [f"**{block['task']}** (T = {block['steps']}, plain {block['plain_training_s']:.2f} s;"
             f" best lr-free {named})", "", "| start | config | own model test loss | "
             "vs best lr-free | wall / plain | CPU / plain |", "|---|---|---|---|---|---|"]
    for r in block["online"]:
        if "test_loss" not in r:
            lines.append(f"| {r['start']} | {r['config'] or 'default'} | {r.get('note', '-')} "
                         "| - | - | - |")
            continue
        vs = "-" if best is None else f"{r['test_loss'] / best:.3f}"
        lines.append(f"| {r['start']} | {r['config'] or 'default'} | {r['test_loss']:.4f} | "
                     f"{vs} | {r['time_ratio']:.2f} | {r['cpu_ratio']:.2f} |")
    for r in block["lr_free"]:
        method = r["method"] + (f" (skipped: {r['skipped']})" if r.get("skipped") else "")
        lines.append(f"| x1 | {method} | {_num(r.get('test_loss'), '.4f')} | | "
                     f"{_num(r.get('time_ratio'), '.2f')} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["tabular_mlp", "gru_seq"])
    parser.add_argument("--configs", nargs="+", default=[""],
                        help="override sets, each a space-separated list of key=value")
    parser.add_argument("--starts", nargs="*", type=float, default=[],
                        help="lr start factors besides x1 (e.g. 0.1 10)")
    parser.add_argument("--no-lr-free", action="store_true",
                        help="online rows only (no Prodigy / schedule-free / D-Adapt rows)")
    parser.add_argument("--out", type=Path, default=RESULTS / "online_defaults.json")
    args = parser.parse_args()
    blocks = [run_task(name, args.configs, args.starts, not args.no_lr_free)
              for name in args.tasks]
    for block in blocks:
        print(table(block) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tasks": blocks}, indent=1))


if __name__ == "__main__":
    main()
