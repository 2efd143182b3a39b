"""What the global phase's plain points save: the offline default run from the suite's far
starts, with the points trained plainly (the default since session 35) against the same run
with every point also computing its hypergradient (the rule before: nothing used it).

For each task and start, in one process, the two runs one after the other (``loop.run()`` of
``hyperdiff run``'s default offline config, no report, no run directory; the order alternates
from row to row): their wall and CPU times, whether the phase ran (``explore_when = "weak"``
decides at step 0), the points' own wall time (their records' ``step_time_s``: less noisy
than the runs' totals on a shared machine), and whether the two histories agree on every
value, loss and best step. The plain points train to the same theta_T bit for bit, so they
should, except where a point's hypergradient is not finite: that point failed before and is
ranked by its loss now (``differing_records`` lists such records, ``same_values_and_best``
says whether the run still went through the same values to the same best step). The saving is
what the phase's points cost above plain trainings, so it grows with the method's cost over a
plain training: 2-4x on the suite's tasks.

    OMP_NUM_THREADS=1 python benchmarks/global_phase_cost.py            # ~15 min
    OMP_NUM_THREADS=1 python benchmarks/global_phase_cost.py --tasks gru_seq --starts x0p01

Writes ``benchmarks/results/global_phase_cost_s35.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import hyperdiff.tuner.offline_plan as offline_plan
from hyperdiff.app.config import load_config
from hyperdiff.app.plans import build

HERE = Path(__file__).resolve().parent
TASKS = ("char_lm", "shapes_cnn", "tabular_mlp", "gru_seq", "logistic_wide")
STARTS = {"x0p01": "build_lr_x0p01", "x0p1": "build_lr_x0p1", "x10": "build_lr_x10",
          "x100": "build_lr_x100"}
COMPARED = ("hparams", "status", "val_loss", "selection_loss", "best", "trainings")


@contextlib.contextmanager
def hypergradient_points() -> Iterator[None]:
    """The rule before: every step, the global phase's points included, computes its
    hypergradient (``sampled_outcome`` with ``plain`` ignored)."""
    original = offline_plan.sampled_outcome

    def every_step(loop: Any, sampler: Any, step: int, raw: Any, plain: bool = False) -> Any:
        return original(loop, sampler, step, raw, False)

    offline_plan.sampled_outcome = every_step  # type: ignore[assignment]
    try:
        yield
    finally:
        offline_plan.sampled_outcome = original


def timed_run(ref: str, points: str) -> dict[str, Any]:
    """The default offline run of task ``ref`` (``points``: ``plain`` or ``hypergradient``);
    its times, steps, whether the global phase ran, and its records' compared fields."""
    _task, loop = build(load_config(overrides=[f"task.name={ref}", "outer.mode=offline"]))
    context = hypergradient_points() if points == "hypergradient" else contextlib.nullcontext()
    with context:
        wall, cpu = time.perf_counter(), time.process_time()
        result = loop.run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    history = result.history
    phase = range(1, loop.plan.gradient_start)
    return {"points": points, "wall_s": wall, "cpu_s": cpu, "steps": len(history),
            "points_s": sum(r.step_time_s for r in history if r.step in phase),
            "explored": loop.plan.gradient_start > 0, "best_step": result.best_step,
            "best_loss": result.best_loss,
            "records": [{k: getattr(r, k) for k in COMPARED} for r in history]}


def row(task: str, start: str, first: str) -> dict[str, Any]:
    """Both runs of ``task`` from ``start`` (``first`` runs first); their ratio and agreement."""
    ref = f"{HERE / 'suite_tasks' / task}.py:{STARTS[start]}"
    runs = {p: timed_run(ref, p) for p in (first, "plain" if first != "plain" else
                                            "hypergradient")}
    plain, full = runs["plain"], runs["hypergradient"]
    same = plain["records"] == full["records"]
    differing = [{"step": i, "plain": a["status"], "hypergradient": b["status"],
                  "plain_val_loss": a["val_loss"], "hypergradient_val_loss": b["val_loss"]}
                 for i, (a, b) in enumerate(zip(plain["records"], full["records"],
                                                strict=False)) if a != b]
    values = [[r["hparams"] for r in run["records"]] for run in (plain, full)]
    for r in runs.values():
        del r["records"]
    return {"task": task, "start": start, "explored": plain["explored"], "same_history": same,
            "same_values_and_best": values[0] == values[1] and
            plain["best_step"] == full["best_step"], "differing_records": differing,
            "plain": plain, "hypergradient": full,
            "points_ratio": plain["points_s"] / full["points_s"] if full["points_s"] else None,
            "wall_ratio": plain["wall_s"] / full["wall_s"],
            "cpu_ratio": plain["cpu_s"] / full["cpu_s"]}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | start | phase ran | same history | CPU s, hypergradient points | "
             "CPU s, plain points | plain / before (CPU) | (wall) | the points' wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "yes" if r["same_history"] else "values and best: " + (
            "yes" if r["same_values_and_best"] else "**no**") + "; " + ", ".join(
            f"step {d['step']} {d['hypergradient']} -> {d['plain']}"
            for d in r["differing_records"])
        lines.append(f"| {r['task']} | {r['start']} | {'yes' if r['explored'] else 'no'} | "
                     f"{same} | "
                     f"{r['hypergradient']['cpu_s']:.1f} | {r['plain']['cpu_s']:.1f} | "
                     f"{r['cpu_ratio']:.3f} | {r['wall_ratio']:.3f} | " + (
                         f"{r['hypergradient']['points_s']:.1f} -> {r['plain']['points_s']:.1f}"
                         if r["explored"] else "-") + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--starts", nargs="+", default=["x0p01", "x10"], choices=list(STARTS))
    parser.add_argument("--out", type=Path,
                        default=HERE / "results" / "global_phase_cost_s35.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for i, (task, start) in enumerate((t, s) for t in args.tasks for s in args.starts):
        rows.append(row(task, start, "plain" if i % 2 == 0 else "hypergradient"))
        r = rows[-1]
        print(f"{task} {start}: phase {'ran' if r['explored'] else 'did not run'}, same "
              f"history {r['same_history']}, CPU {r['hypergradient']['cpu_s']:.1f} -> "
              f"{r['plain']['cpu_s']:.1f} s ({r['cpu_ratio']:.3f}), the points "
              f"{r['hypergradient']['points_s']:.1f} -> {r['plain']['points_s']:.1f} s",
              flush=True)
    explored = [r["cpu_ratio"] for r in rows if r["explored"]]
    summary = {"rows": len(rows), "explored": len(explored),
               "same_history": sum(r["same_history"] for r in rows),
               "same_values_and_best": sum(r["same_values_and_best"] for r in rows),
               "cpu_ratio_geometric_mean_explored": (
                   math.exp(statistics.fmean(math.log(x) for x in explored))
                   if explored else None)}
    print(table(rows))
    print(json.dumps(summary))
    args.out.write_text(json.dumps({
        "command": "OMP_NUM_THREADS=1 python benchmarks/global_phase_cost.py "
                   f"--tasks {' '.join(args.tasks)} --starts {' '.join(args.starts)}",
        "rows": rows, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
