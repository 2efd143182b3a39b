"""Where online tuning of ``horizon_digits`` is reliable: its default from many starting peaks.

``benchmarks/horizon.py`` measures the task's default (online ``curvature``, K=20, forgetting
over an optimization time of 20, normalised SGD outer steps of 0.2 with cosine decay) from the
task's start lr_peak = 0.05 and from 10x too small / too large. This script scans the start
(lr_peak 0.005 ... 0.5, the schedule's shape and the weight decay at their initial values),
each over the online run's minibatch order from tuning seeds 0-5, with the hot-start measure
of each run (:mod:`hyperdiff.tuner.hot_start`: the optimization time trained in the first 10%
of the run over the one its values by then give those steps). Rows:

- ``task default``: ``hot_start="restart"``, the default of ``method="curvature"``: above a
  measure of 2 the run starts over once from theta_0 with the values found, the learning rate
  divided by the measure (cost: the first 10% of the run again);
- ``hot_start=warn``: the same run without the restart (what the default did before), from
  the starts whose measure can exceed 2 (0.1 and above; below, both rows are the same runs).

Every tuned configuration is evaluated as in ``horizon.py``: fresh N-step trainings with the
3 evaluation seeds, test loss on the held-out split, compared with the 5-point grid's best
(lr_peak = 0.1, the grid point that ``horizon.py`` picks by validation loss).

    python benchmarks/horizon_starts.py            # ~10 minutes on 2 cores
    python benchmarks/horizon_starts.py --quick    # N = 500, 2 tuning seeds, 3 starts
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from horizon import EVAL_SEED, NAMES, evaluate, online_row, raw_of, values_of

from hyperdiff.app.tasks import build_task

RESULTS = Path(__file__).parent / "results" / "horizon_starts.json"
STARTS = (0.005, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
GRID_BEST = 0.1  # horizon.py's grid point picked by validation loss
DEFAULT = {"window": 20, "method": "curvature", "horizon": 20.0, "horizon_unit": "lr",
           "optimizer": "sgd", "normalize": True, "lr": 0.2, "schedule": "cosine"}


def _ratios(summary: dict) -> str:
    ratios = [r for r in summary["hot_start_ratios"] if r is not None]
    if not ratios:
        return "-"
    return f"{min(ratios):.2f}-{max(ratios):.2f} ({summary['warned']} of {summary['runs']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=500, 2 tuning seeds, 3 starts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    horizon = 500 if args.quick else 2000
    seeds = tuple(EVAL_SEED + i for i in range(3))
    tuning_seeds = (0, 1) if args.quick else (0, 1, 2, 3, 4, 5)
    starts = (0.005, 0.05, 0.5) if args.quick else STARTS
    task = build_task("horizon_digits", steps=horizon)
    started = time.perf_counter()
    grid = evaluate(task, raw_of(task, {**values_of(task, task.hparams.raw),
                                        "lr_peak": GRID_BEST}), seeds)
    target = grid["test_loss"]
    print(f"horizon_digits, N={horizon}: grid best (lr_peak={GRID_BEST}) test loss "
          f"{target:.4f}", flush=True)
    configs: list[tuple[str, dict[str, str], tuple[float, ...]]] = [
        ("task default", {}, starts),
        ("hot_start=warn", {"hot_start": "warn"}, tuple(x for x in starts if x >= 0.1))]
    rows, summary = [], []
    for label, extra, config_starts in configs:
        for peak in config_starts:
            runs = []
            for tuning_seed in tuning_seeds:
                row = online_row(task, label, peak, seeds, tuning_seed, **DEFAULT, **extra)
                row["within_grid_best"] = row["test_loss"] <= target
                runs.append(row)
                values = ", ".join(f"{row['values'][n]:.3g}" for n in NAMES)
                ratio = row["hot_start_ratio"]
                print(f"  {row['label']}: {values}; test {row['test_loss']:.4f}; cost "
                      f"{row['cost']:.2f}x; hot-start ratio "
                      f"{'-' if ratio is None else f'{ratio:.2f}'}"
                      f"{', restarted' if row['restarted'] else ''}", flush=True)
            losses = [r["test_loss"] for r in runs]
            summary.append({"config": label, "start": peak, "test_losses": losses,
                            "median_test_loss": statistics.median(losses),
                            "within_grid_best": sum(r["within_grid_best"] for r in runs),
                            "runs": len(runs), "cost": statistics.fmean(r["cost"] for r in runs),
                            "hot_start_ratios": [r["hot_start_ratio"] for r in runs],
                            "warned": sum(bool(r["warnings"]) for r in runs),
                            "restarted": sum(r["restarted"] for r in runs)})
            rows.extend(runs)
    header = ("| config | start lr_peak | test loss per tuning seed | median | within the "
              f"grid's best ({target:.4f}) | cost (mean) | hot-start ratio at 10% (restarted or "
              "warned) |\n"
              "|---|---|---|---|---|---|---|")
    lines = [f"| {s['config']} | {s['start']:g} | "
             f"{' / '.join(f'{x:.4f}' for x in s['test_losses'])} | "
             f"{s['median_test_loss']:.4f} | {s['within_grid_best']} of {s['runs']} | "
             f"{s['cost']:.2f}x | {_ratios(s)} |" for s in summary]
    table = "\n".join([header, *lines])
    print("\n" + table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "task": "horizon_digits", "N": horizon, "eval_seeds": list(seeds),
        "grid_best": {"lr_peak": GRID_BEST, **grid}, "rows": rows, "summary": summary,
        "table": table, "quick": args.quick, "time_s": time.perf_counter() - started,
    }, indent=1, default=float))
    print(f"\nwrote {RESULTS} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
