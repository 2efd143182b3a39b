"""The one outer loop against the two loops it replaced: the same jobs, side by side.

Each job is built as ``hyperdiff run`` builds it (``PLANS[mode].build``) and run to its end,
in a fresh child process per code tree: this tree and ``--baseline``, a tree of the code
before the one loop (``git archive e6b57c7 src | tar -x -C /tmp/old``). The children run
interleaved, ``--repeats`` times each; the table shows the best wall time per outer step of
each tree and their ratio, and whether the two histories are equal apart from timing fields.
Timings on a shared machine are noisy: the best of several rounds and the ratio within one run
are the point.

    OMP_NUM_THREADS=1 python benchmarks/one_loop.py --baseline /tmp/old/src

Writes benchmarks/results/one_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "one_loop.json"
SRC = HERE.parent / "src"
JOBS = {
    "offline ridge_diabetes (10 steps x 40 inner)": [
        "task.name=ridge_diabetes", "stop.max_steps=10", "inner.steps=40", "report.seeds=1",
        "outer.optimizer=rmsprop", "outer.lr=0.1"],
    "offline mlp_digits (4 steps x 40 inner, 2 samples)": [
        "task.name=mlp_digits", "stop.max_steps=4", "inner.steps=40", "outer.samples=2",
        "report.seeds=1", "outer.optimizer=adam", "outer.lr=0.1"],
    "online mlp_digits (200 inner, window 10)": [
        "task.name=mlp_digits", "outer.mode=online", "task.cv_folds=0", "inner.steps=200",
        "outer.window=10", "report.seeds=1", "method.name=reverse", "outer.optimizer=adam",
        "outer.lr=0.1", "outer.samples=1"],
    "online horizon_digits curvature (200 inner, window 20)": [
        "task.name=horizon_digits", "outer.mode=online", "task.cv_folds=0", "inner.steps=200",
        "outer.window=20",
        "report.seeds=1"],
}
"""Each job pins the outer settings that were its defaults in the baseline (the tasks' outer
optimizer and lr before signstep, online reverse windows before curvature), so that both trees
run the same job whatever today's defaults are."""
AFTER_ONLY = {"outer.mode=online": ["outer.window_growth=0"]}
"""Overrides for this tree only, where a job holds the key: settings the baseline has no key
for (it has no growing windows)."""
TIMING = ("time_s", "step_time_s")


def child(overrides: list[str]) -> None:
    """Build and run one job in this process's tree; print its time and stripped history."""
    from hyperdiff.app.config import load_config
    from hyperdiff.app.plans import PLANS

    config = load_config(overrides=overrides)
    _, loop = PLANS[config.outer.mode].build(config)
    started = time.perf_counter()
    loop.run(progress=False)
    seconds = time.perf_counter() - started
    history = [{k: v for k, v in json.loads(r.to_json()).items() if k not in TIMING}
               for r in loop.history]
    print(json.dumps({"seconds": seconds, "steps": len(history), "history": history}))


def run_child(src: Path, overrides: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(overrides)], env=env,
                         capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="src/ of the code before the one loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.baseline is None:
        parser.error("--baseline SRC is required (the code before the one loop)")
    rows = []
    print(f"{'job':58} {'before s/step':>13} {'after s/step':>12} {'after/before':>12}  same")
    for label, overrides in JOBS.items():
        best: dict[str, float] = {}
        outcome: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeats):
            for tree, src in (("before", args.baseline), ("after", SRC)):
                extra = [o for key, more in AFTER_ONLY.items() if key in overrides
                         for o in more] if tree == "after" else []
                result = run_child(src, overrides + extra)
                per_step = result["seconds"] / result["steps"]
                best[tree] = min(best.get(tree, per_step), per_step)
                outcome[tree] = result
        same = outcome["before"]["history"] == outcome["after"]["history"]
        ratio = best["after"] / best["before"]
        print(f"{label:58} {best['before']:13.4f} {best['after']:12.4f} {ratio:12.3f}  {same}")
        rows.append({"job": label, "overrides": overrides, "before_s_per_step": best["before"],
                     "after_s_per_step": best["after"], "ratio": ratio,
                     "steps": outcome["after"]["steps"], "same_history": same})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
