"""The online curvature model's scale on a fixed batch: the rule before session 34 (the batch's
rows, ``method.curvature_scale = "rows"``) against the default since (1 where every step trains
on the same rows, ``"auto"``), on every full-batch task with a tuned learning rate.

Rows: ``logistic_wide`` (the suite's only such task; ``reweight_digits``' learning rate is a
number, so no tangent is carried) and the four tasks of ``benchmarks/fixed_batch_tasks.py``,
from their own start and 10x / 100x off, online with the defaults otherwise, at the suite's
first online training seed. Full-batch training is deterministic, so one seed is every seed.
Columns: the run's own model's test loss and its final values retrained on the report seeds,
per rule, and the untuned start's.

    OMP_NUM_THREADS=1 python benchmarks/online_fixed_batch.py    # ~3 min

Writes ``benchmarks/results/online_fixed_batch_s34.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment

HERE = Path(__file__).resolve().parent
SUITE_STARTS = {"x0p01": "build_lr_x0p01", "x0p1": "build_lr_x0p1", "x1": "build",
                "x10": "build_lr_x10", "x100": "build_lr_x100"}
TASKS = ("logistic_wide", "cancer", "mlp_sgd", "mlp_adamw", "ridge")


def reference(task: str, start: str) -> str:
    """The ``task.name`` of ``task`` started at ``start``."""
    if task == "logistic_wide":
        return f"{HERE / 'suite_tasks' / 'logistic_wide.py'}:{SUITE_STARTS[start]}"
    return f"{HERE / 'fixed_batch_tasks.py'}:{task}_{start}"


RULES = ("rows", "auto")
SEED = 1000000  # the suite's first online training seed


def run(task: str, rule: str) -> dict[str, Any]:
    config = load_config(overrides=[f"task.name={task}", "outer.mode=online",
                                    f"outer.train_seed={SEED}",
                                    f"method.curvature_scale={json.dumps(rule)}"])
    with tempfile.TemporaryDirectory() as tmp:
        result = run_experiment(config, out=Path(tmp) / "run", log=lambda _: None,
                                progress=False)
    found = {"own_model_test": result["online_model"]["test"]["loss"],
             "retrained_test": result["tuned"]["metrics"]["test"]["loss"],
             "untuned_test": result["initial"]["metrics"]["test"]["loss"],
             "lr": result["tuned"]["hparams"]["lr"]}
    return {k: v if math.isfinite(v) else None for k, v in found.items()}  # strict JSON


def _text(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--starts", nargs="+", default=list(SUITE_STARTS),
                        choices=list(SUITE_STARTS))
    parser.add_argument("--out", type=Path,
                        default=HERE / "results" / "online_fixed_batch_s34.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.tasks:
        for start in args.starts:
            found = {rule: run(reference(name, start), rule) for rule in RULES}
            ratio = found["auto"]["own_model_test"] / found["rows"]["own_model_test"]
            rows.append({"task": name, "start": start, **found, "own_model_ratio": ratio})
            print(f"{name:14s} {start:6s} own model rows {found['rows']['own_model_test']:.4f} "
                  f"auto {found['auto']['own_model_test']:.4f} ({ratio:.3f}x)  retrained "
                  f"{found['rows']['retrained_test']:.4f} / {found['auto']['retrained_test']:.4f}"
                  f"  untuned {_text(found['auto']['untuned_test'])}", flush=True)
    logs = [math.log(r["own_model_ratio"]) for r in rows]
    summary = {"geometric_mean_own_model_ratio": math.exp(sum(logs) / len(logs)),
               "better": sum(r["own_model_ratio"] < 1 for r in rows),
               "worse": sum(r["own_model_ratio"] > 1 for r in rows), "rows": len(rows)}
    print(summary)
    payload = {"command": "OMP_NUM_THREADS=1 python benchmarks/online_fixed_batch.py",
               "seed": SEED, "rows": rows, "summary": summary}
    args.out.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
