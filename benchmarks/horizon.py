"""Offline tuning on short unrolls vs online tuning during the full run, vs a grid and TPE.

Task ``horizon_digits`` (MLP 64-32-10 on digits, SGD momentum 0.9, batch 32, N = 2000 steps;
hyperparameters: a warmup-cosine lr schedule's peak / warmup / final and a weight decay). Every
tuned configuration is evaluated the same way: a fresh N-step training from theta_0 at its
values, with 3 training seeds that tuning never used, scored on the held-out test split.

Rows:
(a) offline: ``HyperOptimizer`` (reverse mode, 30 outer steps, Adam, cosine decay, best step by
    the selection split) on unrolls of T = 50 / 200 / 1000 steps; the schedule's parameters
    are horizon-free, so the values tuned at T are applied unchanged at N.
(b) online: one N-step run tuning as it trains (``hd.HyperOptimizer`` with ``hd.plans.OnlinePlan``): the previous task default
    (reverse, K=10, backprop through the last step, normalised SGD outer steps of 0.2 with
    cosine decay), the same with K=5 (outer 0.1 cosine, 0.05 constant), reverse windows (K=50,
    backprop through the last 10 steps; outer Adam lr 0.05 constant, and 0.2 with cosine
    decay), HD (reverse, K=1), RTHO (forward,
    K=10), curvature (the learning rate's tangents under a diagonal curvature model, all
    validation rows: K=20 forgetting over an optimization time sum lr_t of 20, the task's
    default, and over 500 steps, each with the online run's minibatch order from tuning seeds
    0-5; K=10 over 500 steps), online implicit (K=50, Neumann); all but
    implicit also started with lr_peak 10x too small / large.
(c) a 5-point grid over lr_peak (schedule shape and weight decay at their initial values; each
    point trained N steps, picked by validation loss) and Optuna TPE over all four
    hyperparameters with as many N-step trainings as the online reverse run costs (and 20).

Cost is wall time over the time of one plain N-step training (``hd.testing.train``), measured right
before and after each tuning run on this shared machine (noisy: the ratio is what to read).

    python benchmarks/horizon.py            # ~5-10 minutes on 2 busy cores
    python benchmarks/horizon.py --quick    # N = 500, T = 50 / 200, 1 seed
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import hyperdiff as hd
from hyperdiff.app.search import OPTUNA_MISSING, optuna_available, run_points, tpe_search
from hyperdiff.app.tasks import Task, build_task
from hyperdiff.methods.window_methods import window_method
from hyperdiff.tuner.driver import HyperOptimizer, Stopping

RESULTS = Path(__file__).parent / "results" / "horizon.json"
EVAL_SEED = 1_000_000
GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
START = 0.05  # the task's initial lr_peak; starts 10x too small / large: 0.005 / 0.5
NAMES = ("lr_peak", "lr_warmup", "lr_final", "wd")
TUNING_SEEDS = (0, 1, 2, 3, 4, 5)  # minibatch orders of the online run itself (curvature)


def plain_time(task: Task) -> float:
    started = time.perf_counter()
    hd.testing.train(task.problems[0])
    return time.perf_counter() - started


def evaluate(task: Task, raw: dict[str, torch.Tensor], seeds: tuple[int, ...]) -> dict[str, Any]:
    """Test loss / accuracy of fresh N-step trainings at ``raw``, one per seed."""
    losses, accs = [], []
    for seed in seeds:
        try:
            report = task.evaluate(raw, seeds=(seed,))
            losses.append(report["test"]["loss"])
            accs.append(report["test"]["accuracy"])
        except FloatingPointError:
            losses.append(math.inf)
            accs.append(0.0)
    return {"test_loss": statistics.fmean(losses),
            "test_loss_std": statistics.pstdev(losses) if all(map(math.isfinite, losses))
            else math.nan,
            "test_accuracy": statistics.fmean(accs), "test_losses": losses}


def values_of(task: Task, raw: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float(v) for n, v in task.hparams.natural(raw).items()}


def raw_of(task: Task, values: dict[str, float]) -> dict[str, torch.Tensor]:
    return task.hparams.with_natural(**values).raw


def offline_row(steps: int, horizon: int, task: Task, base: float, seeds) -> dict[str, Any]:
    short = build_task("horizon_digits", steps=steps)
    opt = HyperOptimizer(list(short.problems), method="reverse", optimizer="adam", lr=0.05,
                         schedule="cosine",
                         selection=short.selection, stopping=Stopping(max_steps=30, patience=None))
    before = plain_time(task)
    started = time.perf_counter()
    result = opt.run()
    elapsed = time.perf_counter() - started
    base = (before + plain_time(task)) / 2
    raw = {n: v.clone() for n, v in result.best_raw.items()}
    return {"group": "a", "label": f"offline reverse, T={steps}", "values": values_of(task, raw),
            "cost": elapsed / base, "inner_steps_per_N": result.steps * steps / horizon,
            "time_s": elapsed, **evaluate(task, raw, seeds)}


def online_row(task: Task, label: str, peak: float, seeds, tuning_seed: int = 0,
               **options: Any) -> dict[str, Any]:
    problem = task.problems[0]
    problem = replace(problem, hparams=problem.hparams.with_natural(lr_peak=peak),
                      seed=problem.seed + tuning_seed)
    if tuning_seed:
        label = f"{label}, tuning seed {tuning_seed}"
    before = plain_time(task)
    options = dict(options)
    plan = hd.plans.OnlinePlan(window=options.pop("window"),
                               val_batch_size=options.pop("val_batch_size", None),
                               hot_start=options.pop("hot_start", None))
    method = window_method(options.pop("method"), problem, **{
        k: options.pop(k) for k in ("backprop", "horizon", "horizon_unit", "solver", "engine")
        if k in options})
    tuner = HyperOptimizer(problem, plan=plan, method=method, selection=task.selection,
                              schedule=options.pop("schedule", "constant"), **options)
    started = time.perf_counter()
    result = tuner.run()
    elapsed = time.perf_counter() - started
    after = plain_time(task)
    hview = task.hparams.view(problem.raw_tensors(result.final_raw))
    own = task.metrics_at(result.params, result.buffers, hview)["test"]
    return {"group": "b", "label": f"{label}, start lr_peak={peak:g}", "start": peak,
            "config": label.split(", tuning seed")[0], "tuning_seed": tuning_seed,
            "values": values_of(task, result.final_raw), "cost": 2 * elapsed / (before + after),
            # a hot-start restart trained the steps up to its measure's window again
            "inner_steps_per_N": 1.0 + (plan.hot_start_measure[0] / problem.steps
                                        if plan.restarted and plan.hot_start_measure else 0.0),
            "time_s": elapsed, "online_model_test_loss": own["loss"],
            "failed_windows": sum(r.status == "failed" for r in result.history),
            "hot_start_ratio": None if plan.hot_start_measure is None
            else plan.hot_start_measure[1], "restarted": plan.restarted,
            "warnings": list(result.warnings),
            **evaluate(task, result.final_raw, seeds)}


def black_box_rows(task: Task, base: float, seeds, budget: int, quick: bool
                   ) -> list[dict[str, Any]]:
    rows = []
    initial = values_of(task, task.hparams.raw)
    before = plain_time(task)
    grid = run_points(task, [{**initial, "lr_peak": p} for p in GRID], method="grid")
    base = (before + plain_time(task)) / 2
    for trial in grid.trials:
        rows.append({"group": "c", "label": f"grid lr_peak={trial.values['lr_peak']:g}",
                     "values": trial.values, "val_loss": trial.objective,
                     "cost": None, "inner_steps_per_N": 1.0,
                     **evaluate(task, raw_of(task, trial.values), seeds)})
    best = min(rows, key=lambda r: r["val_loss"])
    rows.append({**best, "label": f"grid best by val loss (lr_peak={best['values']['lr_peak']:g})",
                 "cost": grid.time_s / base, "inner_steps_per_N": float(len(GRID)),
                 "grid_best": True})
    if not optuna_available():
        rows.append({"group": "c", "label": "Optuna TPE", "skipped": OPTUNA_MISSING})
        return rows
    for trials in sorted({budget, 5 if quick else 20}):
        before = plain_time(task)
        result = tpe_search(task, trials, seed=0)
        base = (before + plain_time(task)) / 2
        rows.append({"group": "c", "label": f"Optuna TPE, {trials} trainings",
                     "values": result.best.values, "cost": result.time_s / base,
                     "inner_steps_per_N": float(trials),
                     **evaluate(task, raw_of(task, result.best.values), seeds)})
    return rows


def online_configs(quick: bool) -> list[tuple[Any, ...]]:
    """(label, options, starts[, tuning seeds]) per online configuration."""
    starts = (START, START / 10, START * 10)
    return [
        ("online reverse K=10 (backprop 1), normalised SGD lr 0.2 cosine (previous default)",
         {"method": "reverse", "window": 10, "backprop": 1, "optimizer": "sgd",
          "normalize": True, "lr": 0.2, "schedule": "cosine", "val_batch_size": 32}, starts),
        ("online reverse K=5 (backprop 1), normalised SGD lr 0.1 cosine",
         {"method": "reverse", "window": 5, "backprop": 1, "optimizer": "sgd",
          "normalize": True, "lr": 0.1, "schedule": "cosine", "val_batch_size": 32}, starts),
        ("online reverse K=5 (backprop 1), normalised SGD lr 0.05 constant",
         {"method": "reverse", "window": 5, "backprop": 1, "optimizer": "sgd",
          "normalize": True, "lr": 0.05, "val_batch_size": 32}, starts),
        ("online reverse K=50 (backprop 10)",
         {"method": "reverse", "window": 50, "backprop": 10, "lr": 0.05, "val_batch_size": 128},
         starts),
        ("online reverse K=50 (backprop 10), outer lr 0.2 cosine",
         {"method": "reverse", "window": 50, "backprop": 10, "lr": 0.2, "schedule": "cosine",
          "val_batch_size": 128}, starts),
        ("HD (online reverse K=1)",
         {"method": "reverse", "window": 1, "lr": 0.02, "val_batch_size": 32}, starts),
        ("RTHO (online forward K=10)",
         {"method": "forward", "window": 10, "lr": 0.05, "val_batch_size": 64}, starts),
        ("online curvature K=20 (lr horizon 20), normalised SGD lr 0.2 cosine (task default)",
         {"method": "curvature", "window": 20, "horizon": 20.0, "horizon_unit": "lr",
          "optimizer": "sgd", "normalize": True, "lr": 0.2, "schedule": "cosine",
          "val_batch_size": None}, starts, TUNING_SEEDS),
        ("online curvature K=20 (horizon 500 steps), normalised SGD lr 0.2 cosine",
         {"method": "curvature", "window": 20, "horizon": 500, "optimizer": "sgd",
          "normalize": True, "lr": 0.2, "schedule": "cosine", "val_batch_size": None}, starts,
         TUNING_SEEDS),
        ("online curvature K=10 (horizon 500), normalised SGD lr 0.2 cosine",
         {"method": "curvature", "window": 10, "horizon": 500, "optimizer": "sgd",
          "normalize": True, "lr": 0.2, "schedule": "cosine", "val_batch_size": None}, starts),
        ("online implicit K=50 (Neumann 5)",
         {"method": "implicit", "window": 50, "lr": 0.05, "val_batch_size": 64,
          "solver": hd.solvers.neumann(iterations=5, step=1.0)}, (START,)),
    ]


def fmt(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"| {row['label']} | skipped: {row['skipped']} | | | | | | |"
    v = row["values"]
    values = ", ".join(f"{v[n]:.3g}" for n in NAMES)
    cost = "-" if row.get("cost") is None else f"{row['cost']:.2f}"
    own = row.get("online_model_test_loss")
    failed = row.get("failed_windows")
    return (f"| {row['label']} | {values} | {cost} | {row['inner_steps_per_N']:.3g} | "
            f"{row['test_loss']:.4f} ± {row['test_loss_std']:.4f} | "
            f"{row['test_accuracy']:.4f} | {'-' if own is None else f'{own:.4f}'} | "
            f"{'-' if failed is None else failed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=500, T=50/200, 1 seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    horizon = 500 if args.quick else 2000
    unrolls = (50, 200) if args.quick else (50, 200, 1000)
    seeds = tuple(EVAL_SEED + i for i in range(1 if args.quick else 3))
    task = build_task("horizon_digits", steps=horizon)
    started = time.perf_counter()
    base = statistics.median(plain_time(task) for _ in range(3))
    print(f"horizon_digits, N={horizon}: one plain N-step training takes {base:.2f} s",
          flush=True)
    rows = [{"group": "-", "label": "initial values", "values": values_of(task, task.hparams.raw),
             "cost": 0.0, "inner_steps_per_N": 1.0,
             **evaluate(task, task.hparams.raw, seeds)}]
    for steps in unrolls:
        rows.append(offline_row(steps, horizon, task, base, seeds))
        print(fmt(rows[-1]), flush=True)
    for label, options, starts, *more in online_configs(args.quick):
        for tuning_seed in (more[0] if more else (0,)):
            for peak in starts:
                rows.append(online_row(task, label, peak, seeds, tuning_seed, **options))
                print(fmt(rows[-1]), flush=True)
    budget = math.ceil(max(r["cost"] for r in rows if r["label"].startswith("online reverse")))
    rows.extend(black_box_rows(task, base, seeds, budget, args.quick))
    header = ("| row | lr_peak, lr_warmup, lr_final, wd | cost (x plain N-step training) | "
              "inner steps / N | test loss (fresh N-step trainings) | test accuracy | "
              "test loss of the online run's own model | failed windows (guard) |\n"
              "|---|---|---|---|---|---|---|---|")
    table = "\n".join([header, *map(fmt, rows)])
    print("\n" + table)
    grid_best = next(r for r in rows if r.get("grid_best"))
    checks = []
    for row in rows:
        if row["group"] == "b":
            checks.append({"row": row["label"], "cost_at_most_2x": row["cost"] <= 2.0,
                           "test_loss_at_most_grid_best": row["test_loss"]
                           <= grid_best["test_loss"]})
    print(f"\ngrid best (by validation loss) test loss: {grid_best['test_loss']:.4f}")
    repeated = sorted({r["config"] for r in rows if r.get("tuning_seed")})
    summary = []
    for config in repeated:
        for start in sorted({r["start"] for r in rows if r.get("config") == config}):
            runs = [r for r in rows if r.get("config") == config and r["start"] == start]
            losses = [r["test_loss"] for r in runs]
            summary.append({"config": config, "start": start, "test_losses": losses,
                            "mean_test_loss": statistics.fmean(losses),
                            "cost": statistics.fmean(r["cost"] for r in runs),
                            "within_grid_best": sum(x <= grid_best["test_loss"]
                                                    for x in losses)})
            print(f"{config}, start {start:g}, tuning seeds {len(runs)}: test loss "
                  f"{', '.join(f'{x:.4f}' for x in losses)} (mean {summary[-1]['mean_test_loss']:.4f}); "
                  f"cost {summary[-1]['cost']:.2f}x; within the grid's best in "
                  f"{summary[-1]['within_grid_best']} of {len(runs)}")
    for check in checks:
        print(f"{check['row']}: cost <= 2x: {check['cost_at_most_2x']}; test loss <= grid "
              f"best: {check['test_loss_at_most_grid_best']}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "task": "horizon_digits", "N": horizon, "unrolls": list(unrolls),
        "eval_seeds": list(seeds), "plain_time_s": base, "rows": rows, "checks": checks,
        "tuning_seed_summary": summary,
        "table": table, "quick": args.quick, "time_s": time.perf_counter() - started,
    }, indent=1, default=float))
    print(f"\nwrote {RESULTS} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
