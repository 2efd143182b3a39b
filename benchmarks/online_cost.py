"""What an online run costs over one plain training, where the time goes, and what it buys.

For each task of the suite (``benchmarks/suite_tasks/``) and each online configuration (config
overrides; ``""`` is ``outer.mode = "online"`` alone): the online run from the task's start
(and from ``--starts`` off), its wall and CPU time over one plain training of the same T steps
(best of ``--repeats`` for both, measured side by side in this process, the plain trainings
before and after the task), the run's own final model on the held-out test split (no
retraining), and Prodigy, schedule-free AdamW and D-Adaptation Adam on the same steps and
minibatches with their published defaults (``suite.py``'s rows, mean of 3 seeds). With
``--profile`` one more run of the first configuration under cProfile, its time split into the
training steps, the window hypergradient (tangents, learning-rate derivatives, the last step's
backward pass), validation batches, the outer step, records and guard, and the rest.

    OMP_NUM_THREADS=1 python benchmarks/online_cost.py --profile \
        --configs "" "outer.window_growth=0" --out benchmarks/results/online_cost.json

CPU time of this one-threaded process is far less sensitive to the other jobs of a shared
machine than wall time, but not immune: repeat and compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suite_tasks"))

from online_defaults import best_lr_free, plain_training, skipped_lines, timed_online  # noqa: E402
from suite import (  # noqa: E402
    HOLDOUT_TASKS,
    LR_FREE,
    SEEDS,
    TASK_DIR,
    TASKS,
    _load,
    _num,
    lr_free_row,
)
from suite_common import start_name  # noqa: E402

import hyperdiff as hd  # noqa: E402
from hyperdiff.app.config import load_config  # noqa: E402
from hyperdiff.app.plans import build_online  # noqa: E402
from hyperdiff.app.tasks.base import trained_params  # noqa: E402

RESULTS = HERE / "results"

# profile areas: (label, functions as (file suffix, function name), callers as the same pairs
# or None: all)
AREAS: tuple[tuple[str, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...] | None],
             ...] = (
    ("training steps (forward, backward, optimizer)",
     (("engine/training.py", "train_gradient"), ("engine/optimizers.py", "update")), None),
    ("  of which data (minibatches)", (("engine/data/sources.py", "batch"),
                                       ("engine/data/streaming.py", "batch")), None),
    ("tangents (curvature rule, every step)",
     (("methods/curvature.py", "_sgd_advance"), ("methods/curvature.py", "_sgd_values"),
      ("methods/curvature_adam.py", "advance_adam"),
      ("methods/curvature_adam.py", "_adam_values"),
      # a tangent with no rows: the squared-gradient average alone (s30)
      ("methods/curvature.py", "_sgd_average"), ("methods/curvature_adam.py", "adam_average")),
     None),
    ("learning-rate derivatives (per window)", (("methods/curvature.py", "lr_derivatives"),),
     None),
    # the window's validation gradients through its last step: methods/segments.py's
    # sample_grads (its comprehension, a caller of its own) since the online samples; it was
    # curvature_segment's own call before, and this area read 0 since
    ("last step's backward pass (per window)", (("torch/autograd/__init__.py", "grad"),),
     (("methods/curvature.py", "curvature_segment"), ("methods/segments.py", "sample_grads"),
      ("methods/segments.py", "<listcomp>"))),
    ("validation loss (per window, guard, selection)",
     (("engine/training.py", "validation_loss"),), None),
    ("outer step", (("tuner/driver.py", "_update"),), None),
    ("records, snapshot, guard, hot start",
     (("tuner/driver.py", "_make_record"), ("tuner/driver.py", "_snapshot"),
      ("tuner/guard.py", "check_values"), ("tuner/online_plan.py", "commit"),
      ("tuner/history.py", "to_number")), None),
)


def _area_time(stats: pstats.Stats, functions: tuple[tuple[str, str], ...],
               callers: tuple[tuple[str, str], ...] | None) -> float:
    """Cumulative seconds of ``functions`` (called from ``callers`` only, if given)."""
    total = 0.0
    for (file, _line, name), entry in stats.stats.items():  # type: ignore[attr-defined]
        if not any(file.endswith(suffix) and name == fn for suffix, fn in functions):
            continue
        if callers is None:
            total += entry[3]
            continue
        for (cfile, _cline, cname), c_entry in entry[4].items():
            if any(cfile.endswith(suffix) and cname == fn for suffix, fn in callers):
                total += c_entry[3]
    return total


def profiled_cpu(run: Any) -> tuple[float, pstats.Stats]:
    """CPU seconds of ``run()`` under cProfile (timed in CPU time too) and its statistics."""
    profiler = cProfile.Profile(time.process_time)
    started = time.process_time()
    profiler.enable()
    try:
        run()
    finally:
        profiler.disable()
    return time.process_time() - started, pstats.Stats(profiler)


def profile_split(task: hd.Task, ref: str, config: str) -> dict[str, Any]:
    """One online run under cProfile: CPU seconds per area, and over one plain training's
    also run under cProfile (profiling slows Python-heavy code most: both sides pay it)."""
    _, loop = build_online(load_config(overrides=[f"task.name={ref}", "outer.mode=online",
                                                  *config.split()]))
    plain_cpu, _ = profiled_cpu(lambda: trained_params(task.final_problem, task.hparams.raw,
                                                       seed=SEEDS[0]))
    try:
        total, stats = profiled_cpu(loop.run)
    except (hd.HyperdiffError, hd.NonFiniteError) as err:
        return {"note": f"failed: {err}"}
    areas = {label: _area_time(stats, fns, callers) for label, fns, callers in AREAS}
    counted = sum(v for k, v in areas.items() if not k.startswith("  "))
    areas["rest (the loop's Python, hot start)"] = total - counted
    return {"config": config, "total_cpu_s": total, "plain_cpu_s": plain_cpu,
            "areas_s": areas, "areas_over_plain": {k: v / plain_cpu for k, v in areas.items()}}


def online_run(ref: str, config: str, repeats: int) -> dict[str, Any]:
    """The online run with the overrides ``config``, best wall and CPU time of ``repeats``
    (each a fresh loop), the own model's test metrics and the windows."""
    try:
        task, loop, result, wall, cpu = timed_online(ref, config, repeats)
    except (hd.HyperdiffError, hd.NonFiniteError) as err:
        return {"config": config, "note": f"failed: {err}"}
    hview = task.hparams.view(task.final_problem.raw_tensors(result.final_raw))
    test = task.metrics_at(result.params, result.buffers, hview)["test"]
    return {"config": config, "test_loss": test["loss"], "test_accuracy": test.get("accuracy"),
            "time_s": wall, "cpu_s": cpu, "windows": result.hyper_steps,
            "failed_windows": sum(r.status != "ok" for r in result.history),
            "warnings": list(result.warnings), "outer_lr": loop.lr,
            "start_lr": _lr(task, task.hparams.view(task.final_problem.raw_tensors())),
            "tuned": {k: float(v.float().mean()) for k, v in
                      result.final_hparams.natural().items()}}


def _lr(task: hd.Task, hview: Any) -> float | None:
    """The start's learning rate (or schedule peak) for the table, if the task names one."""
    for name in ("lr", "lr_peak"):
        if name in task.hparams.raw:
            return float(hview[name].float().mean())
    return None


def run_task(name: str, configs: list[str], starts: list[float], repeats: int,
             profile: bool, lr_free: bool) -> dict[str, Any]:
    """Every configuration from every start on task ``name``, the lr-free rows and the
    profile; ratios over the faster of the plain trainings timed before and after."""
    ref = f"{TASK_DIR / name}.py:build"
    task = hd.tasks.build_task(ref)
    plain_s, plain_cpu = plain_training(task, repeats)
    has_lr = getattr(_load(TASK_DIR / f"{name}.py"), "LR_NAME", None) is not None
    rows = []
    for factor in [1.0, *(starts if has_lr else [])]:
        started = ref if factor == 1.0 else f"{TASK_DIR / name}.py:{start_name(factor)}"
        for config in configs:
            r = {"start": f"x{factor:g}", **online_run(started, config, repeats)}
            rows.append(r)
            print(f"{name} x{factor:g} [{config or 'default'}]: "
                  f"{_num(r.get('test_loss'), '.4f')}, CPU {_num(r.get('cpu_s'), '.3f')} s "
                  f"(plain {plain_cpu:.3f}) {r.get('note', '')}", flush=True)
    split = profile_split(task, ref, configs[0]) if profile else None
    others = [lr_free_row(task, optimizer, plain_s) for optimizer in LR_FREE] if lr_free else []
    again = plain_training(task, repeats)
    plain_s, plain_cpu = min(plain_s, again[0]), min(plain_cpu, again[1])
    for r in rows:
        if "time_s" in r:
            r["time_ratio"], r["cpu_ratio"] = r["time_s"] / plain_s, r["cpu_s"] / plain_cpu
    return {"task": name, "steps": task.final_problem.steps, "plain_training_s": plain_s,
            "plain_training_cpu_s": plain_cpu, "online": rows, "lr_free": others,
            "profile": split}


def table(block: dict[str, Any]) -> str:
    """The task's rows as markdown: own-model test loss against the best lr-free optimizer,
    CPU and wall time over one plain training; under it the lr-free rows skipped (and why)."""
    best_loss, named = best_lr_free(block)
    lines = [f"**{block['task']}** (T = {block['steps']}, plain {block['plain_training_cpu_s']:.3f}"
             f" s CPU; best lr-free {named})", "",
             "| start | config | own model test loss | vs best lr-free | windows | CPU / plain "
             "| wall / plain |", "|---|---|---|---|---|---|---|"]
    for r in block["online"]:
        if "test_loss" not in r:
            lines.append(f"| {r['start']} | {r['config'] or 'default'} | {r.get('note', '-')} "
                         "| | | | |")
            continue
        vs = "-" if best_loss is None else f"{r['test_loss'] / best_loss:.3f}"
        lines.append(f"| {r['start']} | {r['config'] or 'default'} | {r['test_loss']:.4f} | "
                     f"{vs} | {r['windows']} | {r['cpu_ratio']:.2f} | {r['time_ratio']:.2f} |")
    lines += ["", *skipped_lines(block)] if skipped_lines(block) else []
    return "\n".join(lines)


def profile_table(blocks: list[dict[str, Any]]) -> str:
    """Areas (rows) x tasks (columns): CPU seconds of the profiled run over the plain
    training's."""
    shown = [b for b in blocks if b.get("profile") and "areas_s" in b["profile"]]
    if not shown:
        return ""
    labels = list(shown[0]["profile"]["areas_s"])
    lines = ["| area (CPU over one plain training) | " + " | ".join(b["task"] for b in shown)
             + " |", "|---|" + "---|" * len(shown)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(
            f"{b['profile']['areas_over_plain'][label]:.2f}" for b in shown) + " |")
    lines.append("| total (both under cProfile) | " + " | ".join(
        f"{b['profile']['total_cpu_s'] / b['profile']['plain_cpu_s']:.2f}" for b in shown) + " |")
    return "\n".join(lines)


def task_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tasks``, ``--configs`` and ``--starts`` (also ``online_matched.py``'s)."""
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS + HOLDOUT_TASKS)
    parser.add_argument("--configs", nargs="+", default=[""],
                        help="override sets, each a space-separated list of key=value")
    parser.add_argument("--starts", nargs="*", type=float, default=[],
                        help="lr start factors besides x1 (e.g. 0.1 10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    task_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    parser.add_argument("--profile", action="store_true",
                        help="one more run of the first config under cProfile")
    parser.add_argument("--no-lr-free", action="store_true",
                        help="online rows only (no Prodigy / schedule-free / D-Adapt rows)")
    parser.add_argument("--out", type=Path, default=RESULTS / "online_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    blocks = [run_task(name, args.configs, args.starts, args.repeats, args.profile,
                       not args.no_lr_free) for name in args.tasks]
    for block in blocks:
        print(table(block) + "\n")
    print(profile_table(blocks))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"configs": args.configs, "repeats": args.repeats,
                                    "torch": torch.__version__, "tasks": blocks}, indent=1))


if __name__ == "__main__":
    main()
