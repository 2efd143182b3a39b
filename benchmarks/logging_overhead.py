"""What the TensorBoard and MLflow loggers cost per outer step (offline) and per window (online).

For each task this builds the run's loop, trains its first ``--steps`` steps (windows) and
times the loop's own step (offline without the global phase, ``outer.explore = 0``: its points
are plain trainings); then, side by side in one process, it replays those records into
fresh loggers (``--repeats`` rounds, best of them): the TensorBoard logger (scalars of the tag
scheme, online also ``inner/lr`` at each of the window's inner steps) and the MLflow logger
(the same, into an SQLite store; its store's creation, timed apart, is paid once per run).
Timings on a shared machine are noisy; the ratios to the step in one run are the point.

    OMP_NUM_THREADS=1 python benchmarks/logging_overhead.py

Writes benchmarks/results/logging.json (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.loggers import TensorBoardLogger
from hyperdiff.app.mlflow_logger import MLflowLogger
from hyperdiff.app.plans import PLANS

OUT = Path(__file__).parent / "results" / "logging.json"
CASES = {"mlp_digits (offline)": ["task.name=mlp_digits", "outer.explore=0"],
         "horizon_digits (online)": ["task.name=horizon_digits"]}
"""The offline case without the global phase: ``mlp_digits`` starts weak, and the phase's
points (steps 1..8) are plain trainings without a hypergradient, so the steps timed would
not be gradient steps."""


def replay(logger, loops, records) -> float:
    """Seconds to hand every record to ``logger`` (after its start) and close it (what it
    queued is written then)."""
    started = time.perf_counter()
    for loop, record in zip(loops, records, strict=True):
        logger(loop, record)
    logger.close()
    return time.perf_counter() - started


def measure(name: str, overrides: list[str], steps: int, repeats: int) -> dict:
    config = load_config(overrides=overrides)
    task, loop = PLANS[config.outer.mode].build(config)
    records, loops = [], []
    started = time.perf_counter()
    for _ in range(steps):
        records.append(loop.step())
        # what the logger reads of an online loop after the step: its inner step and window
        loops.append(SimpleNamespace(inner_step=getattr(loop, "inner_step", None),
                                     window=getattr(loop, "window", None)))
    step_s = (time.perf_counter() - started) / steps
    problem = task.problems[0]
    best = {"tensorboard": float("inf"), "mlflow": float("inf")}
    store_s = float("inf")
    with tempfile.TemporaryDirectory(dir=".") as root:
        for round_ in range(repeats):
            board = TensorBoardLogger(Path(root) / f"tb{round_}", problem=problem)
            board.start([])
            best["tensorboard"] = min(best["tensorboard"], replay(board, loops, records))
            (Path(root) / f"ml{round_}").mkdir()
            ml = MLflowLogger(Path(root) / f"ml{round_}", problem=problem)
            t0 = time.perf_counter()
            ml.start([])
            store_s = min(store_s, time.perf_counter() - t0)
            best["mlflow"] = min(best["mlflow"], replay(ml, loops, records))
    per = {k: v / steps for k, v in best.items()}
    return {"case": name, "steps": steps, "step_s": step_s,
            **{f"{k}_s": v for k, v in per.items()},
            **{f"{k}_share_of_step": v / step_s for k, v in per.items()},
            "mlflow_store_s": store_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT, help=f"result file (default: {OUT})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name, overrides, args.steps, args.repeats)
            for name, overrides in CASES.items()]
    print(f"{'case':<26}{'step ms':>9}{'tb ms':>8}{'of step':>9}{'mlflow ms':>11}{'of step':>9}"
          f"{'store s':>9}")
    for r in rows:
        print(f"{r['case']:<26}{1e3 * r['step_s']:>9.1f}{1e3 * r['tensorboard_s']:>8.2f}"
              f"{100 * r['tensorboard_share_of_step']:>8.1f}%{1e3 * r['mlflow_s']:>11.2f}"
              f"{100 * r['mlflow_share_of_step']:>8.1f}%{r['mlflow_store_s']:>9.2f}")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "repeats": args.repeats, "rows": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
