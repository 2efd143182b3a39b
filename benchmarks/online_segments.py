"""What one online window costs per method: an online mlp_digits run, each method's segment.

Each method runs the same online job as ``hyperdiff run --set task.name=mlp_digits --set
outer.mode=online --set method.name=NAME`` builds it (``PLANS["online"].build``; N inner steps,
windows of K) and is timed from its first window to its last (the windows' training, their
hypergradients, the outer steps and the selection losses). Beside it, in the same process and
interleaved with the methods, a plain training of the same problem (``hd.engine.training.train``,
no graph) gives the plain step's time. The table shows, per method, the best of ``--repeats``
rounds of: seconds per window, and that window over the plain training of its K steps (the
online run's cost in plain trainings of the whole run). Timings on a shared machine are noisy:
the ratios within one round, best of n, are the point.

    OMP_NUM_THREADS=1 python benchmarks/online_segments.py            # N=100, K=10
    OMP_NUM_THREADS=1 python benchmarks/online_segments.py --steps 40 --repeats 1

Writes benchmarks/results/online_segments.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "online_segments.json"
METHODS = ("reverse", "checkpointed", "reversible", "forward", "curvature", "finite_difference")
"""The methods timed (``implicit`` is not one: mlp_digits' hyperparameters, its learning rates,
momentum and weight decay, act through the optimizer alone, which an online ``implicit`` window
refuses; before that refusal its windows were timed with a hypergradient of 0)."""


def online_loop(method: str, steps: int, window: int) -> Any:
    """The online mlp_digits loop that ``hyperdiff run`` builds for ``method``."""
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import PLANS

    config = load_config(overrides=[
        "task.name=mlp_digits", "outer.mode=online", f"method.name={method}",
        f"inner.steps={steps}", f"outer.window={window}", "report.seeds=1"])
    return PLANS["online"].build(config)[1]


def time_method(method: str, steps: int, window: int) -> tuple[float, int]:
    """Seconds of one online run and its windows."""
    loop = online_loop(method, steps, window)
    started = time.perf_counter()
    loop.run(progress=False)
    return time.perf_counter() - started, len(loop.history)


def time_plain(steps: int, window: int) -> float:
    """Seconds per step of a plain training of the online run's problem."""
    from hyperdiff.engine.training import train

    problem = online_loop("reverse", steps, window).plan.problem
    started = time.perf_counter()
    train(problem)
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="N, inner steps of the run")
    parser.add_argument("--window", type=int, default=10, help="K, inner steps per window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")  # finite_difference's CostWarning, the lr=0 notes
    plain = float("inf")
    best: dict[str, float] = {}
    windows: dict[str, int] = {}
    for _ in range(args.repeats):
        plain = min(plain, time_plain(args.steps, args.window))
        for name in args.methods:
            seconds, count = time_method(name, args.steps, args.window)
            best[name] = min(best.get(name, float("inf")), seconds / count)
            windows[name] = count
    print(f"online mlp_digits, N={args.steps}, K={args.window}; plain step "
          f"{plain * 1e3:.2f} ms (best of {args.repeats}, torch threads "
          f"{torch.get_num_threads()})")
    print(f"{'method':18} {'s / window':>10} {'window / plain step':>20} "
          f"{'window / K plain steps':>23}")
    rows = []
    for name in args.methods:
        per_step = best[name] / plain
        print(f"{name:18} {best[name]:10.4f} {per_step:20.1f} {per_step / args.window:23.2f}")
        rows.append({"method": name, "seconds_per_window": best[name], "windows": windows[name],
                     "window_over_plain_step": per_step,
                     "window_over_plain_window": per_step / args.window})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "task": "mlp_digits", "steps": args.steps, "window": args.window,
        "repeats": args.repeats, "plain_step_s": plain, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
