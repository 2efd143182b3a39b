"""Online configurations compared as means over the lr-free rows' three training seeds.

For each suite task (from its own start, or from ``--starts`` off) and each configuration
(config overrides; ``""`` is ``outer.mode = "online"`` alone), the online run trained with
``outer.train_seed`` = each of ``suite.SEEDS``: its own final model's test loss (no
retraining) per seed and the mean; beside it, in the same process, the untuned start trained
plainly on the same seeds (the suite's untuned row) and the best of Prodigy, schedule-free AdamW
and D-Adaptation (``suite.py``'s rows, the same seeds). The summary divides every
configuration's means by the first one's: geometric mean over the rows, and how many rows
are at or below the best lr-free optimizer.

    OMP_NUM_THREADS=1 python benchmarks/online_seed_means.py \
        --configs "" "outer.lr=0.35" --out benchmarks/results/online_seed_means.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suite_tasks"))

from online_cost import online_run, task_arguments  # noqa: E402
from online_matched import plain_losses  # noqa: E402
from suite import LR_FREE, SEEDS, TASK_DIR, _load, lr_free_row  # noqa: E402
from suite_common import start_name  # noqa: E402

import hyperdiff as hd  # noqa: E402


def seed_means(ref: str, config: str) -> dict[str, Any]:
    """The online run with the overrides ``config`` once per training seed: per-seed rows,
    the own model's mean test loss (NaN if a seed's run failed) and its total CPU time."""
    runs = [online_run(ref, f"{config} outer.train_seed={seed}", 1) for seed in SEEDS]
    losses = [r.get("test_loss", math.nan) for r in runs]
    return {"config": config, "per_seed": runs, "test_loss": statistics.mean(losses),
            "cpu_s": sum(r.get("cpu_s", math.nan) for r in runs)}


def run_task(name: str, configs: list[str], starts: list[float]) -> list[dict[str, Any]]:
    """Every configuration from every start of task ``name``, with its references."""
    ref = f"{TASK_DIR / name}.py:build"
    task = hd.tasks.build_task(ref)
    has_lr = getattr(_load(TASK_DIR / f"{name}.py"), "LR_NAME", None) is not None
    lr_free = [lr_free_row(task, optimizer, math.nan) for optimizer in LR_FREE]
    ran = [r for r in lr_free if r.get("test_loss") is not None]
    best = min(ran, key=lambda r: r["test_loss"]) if ran else None
    rows = []
    for factor in [1.0, *(starts if has_lr else [])]:
        started = ref if factor == 1.0 else f"{TASK_DIR / name}.py:{start_name(factor)}"
        start_task = hd.tasks.build_task(started)
        untuned = plain_losses(start_task, start_task.hparams.raw, SEEDS)["test"]
        for config in configs:
            r = {"task": name, "start": f"x{factor:g}", "untuned": untuned,
                 "best_lr_free": best["test_loss"] if best else None,
                 "best_lr_free_method": best["method"] if best else None,
                 **seed_means(started, config)}
            rows.append(r)
            print(f"{name} x{factor:g} [{config or 'default'}]: "
                  + " / ".join(f"{p.get('test_loss', math.nan):.4f}" for p in r["per_seed"])
                  + f", mean {r['test_loss']:.4f} (untuned {untuned:.4f}, best lr-free "
                  f"{r['best_lr_free'] or math.nan:.4f}), CPU {r['cpu_s']:.1f} s", flush=True)
    return rows


def summary(rows: list[dict[str, Any]], configs: list[str]) -> list[dict[str, Any]]:
    """Per configuration: geometric mean of its mean test loss over the first
    configuration's (the same task and start), rows at or below the best lr-free optimizer,
    rows better than the first configuration, and CPU over the first configuration's."""
    base = {(r["task"], r["start"]): r for r in rows if r["config"] == configs[0]}
    out = []
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        ratios = [r["test_loss"] / base[(r["task"], r["start"])]["test_loss"] for r in mine]
        cpu = [r["cpu_s"] / base[(r["task"], r["start"])]["cpu_s"] for r in mine]
        out.append({"config": config,
                    "geo_mean_ratio": math.exp(statistics.mean(math.log(x) for x in ratios)),
                    "better": sum(x < 1 for x in ratios), "rows": len(mine),
                    "at_or_below_lr_free": sum(r["best_lr_free"] is not None
                                               and r["test_loss"] <= r["best_lr_free"]
                                               for r in mine),
                    "cpu_geo_mean_ratio": math.exp(statistics.mean(math.log(x) for x in cpu))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    task_arguments(parser)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "online_seed_means.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [r for name in args.tasks for r in run_task(name, args.configs, args.starts)]
    table = summary(rows, args.configs)
    for s in table:
        print(f"[{s['config'] or 'default'}] test loss x{s['geo_mean_ratio']:.3f} of the "
              f"first (geometric mean), better on {s['better']} of {s['rows']}, at or below "
              f"the best lr-free on {s['at_or_below_lr_free']}, CPU x{s['cpu_geo_mean_ratio']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"configs": args.configs, "seeds": list(SEEDS),
                                    "torch": torch.__version__, "summary": table,
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
