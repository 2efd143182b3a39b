"""When should the offline global phase run? ``outer.explore_when`` side by side, over seeds.

Every run is ``run_experiment`` offline with the default config (signstep, constant schedule,
30 outer steps, patience 10, 8 points) except ``outer.explore_when`` and ``outer.seed``, on the
suite's tasks (``benchmarks/suite_tasks/``) from the task's start and its learning rate 10x and
100x off. Score: the held-out test loss of the report's retraining (mean over its 3 seeds) at
the run's best values. The candidates differ only in the decision taken at step 0, so where
``weak`` does not run the phase its run is the ``broken`` run step for step
(``tests/test_weak_start.py``): such a row runs once and is written for both candidates
(``"same_as"``).

    OMP_NUM_THREADS=1 nice python benchmarks/outer_starts.py --tasks tabular_mlp gru_seq \
        --starts 0.01 0.1 1 --seeds 0 1 2 --out /tmp/starts.json
    python benchmarks/outer_starts.py --merge /tmp/a.json /tmp/b.json --out benchmarks/results/x.json
    python benchmarks/outer_starts.py --table benchmarks/results/outer_starts_s27.json

Writes ``--out`` after every run (``runs``: one entry per candidate x task x start x seed).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from outer_defaults import RESULTS, TASKS, run_one

CANDIDATES = ("broken", "weak")
BASELINE = "broken"
STARTS = (0.01, 0.1, 1.0, 10.0, 100.0)
FIXED = {"outer.mode": "offline", "stop.max_steps": 30}


def phase_ran(workdir: Path) -> bool:
    """Whether the run in ``workdir`` tried the global phase's points (its history says so)."""
    lines = (workdir / "history.jsonl").read_text().splitlines()
    return any("global phase: point" in json.loads(line)["message"] for line in lines)


def table(data: dict[str, Any]) -> str:
    """Test loss per task x start: each candidate's seeds and mean, and the ratio of means."""
    runs = data["runs"]
    keys = list(dict.fromkeys((r["task"], r["start"]) for r in runs))
    out = ["test loss (report retraining, mean of 3 seeds) per outer.seed; * = the phase ran",
           "task | start | " + " | ".join(f"{c} (seeds) | {c} mean" for c in CANDIDATES)
           + " | weak / broken"]
    for task, start in keys:
        cells, means = [], {}
        for name in CANDIDATES:
            mine = sorted((r for r in runs if (r["task"], r["start"], r["candidate"])
                           == (task, start, name)), key=lambda r: r["seed"])
            losses = [r["test_loss"] for r in mine if _finite(r["test_loss"])]
            means[name] = sum(losses) / len(losses) if losses else math.nan
            cells += [" / ".join(_num(r["test_loss"]) + ("*" if r.get("phase") else "")
                                 for r in mine), _num(means[name])]
        ratio = means["weak"] / means["broken"] if means["broken"] else math.nan
        out.append(" | ".join([task, f"x{start:g}", *cells, _num(ratio, ".3f")]))
    return "\n".join(out)


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def _num(x: Any, fmt: str = ".4f") -> str:
    return format(x, fmt) if _finite(x) else "-"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["tabular_mlp", "gru_seq"],
                        choices=list(TASKS))
    parser.add_argument("--starts", nargs="+", type=float, default=list(STARTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES),
                        choices=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=RESULTS / "outer_starts.json")
    parser.add_argument("--table", type=Path, help="print the table of a results file")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="combine the runs of these results files into --out")
    args = parser.parse_args(argv)
    if args.merge:
        loaded = [json.loads(path.read_text()) for path in args.merge]
        merged = {**loaded[0], "runs": [r for data in loaded for r in data["runs"]]}
        args.out.write_text(json.dumps(merged, indent=1, default=str))
        args.table = args.out
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    runs: list[dict[str, Any]] = []
    began = time.perf_counter()
    order = sorted(args.candidates, key=lambda c: c != "weak")  # weak first: see the doc
    with tempfile.TemporaryDirectory() as tmp:
        for file in args.tasks:
            starts = [1.0] if file == "reweight" else args.starts
            for start in starts:
                for seed in args.seeds:
                    weak_phase = None
                    for name in order:
                        row = {"candidate": name, "task": file, "start": start, "seed": seed}
                        if name == "broken" and weak_phase is False:
                            same = runs[-1]  # this row's weak run, made just before
                            runs.append({**same, **row, "same_as": "weak"})
                        else:
                            work = Path(tmp) / f"{file}-{start:g}-{seed}-{name}"
                            found = run_one(file, start, {"outer.explore_when": name,
                                                          "outer.seed": seed}, work, FIXED)
                            ran = phase_ran(work) if work.exists() else None
                            runs.append({**row, **found, "phase": ran})
                            if name == "weak":
                                weak_phase = ran
                        r = runs[-1]
                        print(f"[{time.perf_counter() - began:7.1f} s] {file} x{start:g} "
                              f"seed {seed} {name}: test loss {_num(r['test_loss'])}"
                              f"{' (phase)' if r.get('phase') else ''} {r.get('stop_reason')}",
                              flush=True)
                        data = {"settings": FIXED, "baseline": BASELINE,
                                "score": "held-out test loss, report retraining (3 seeds)",
                                "runs": runs}
                        args.out.write_text(json.dumps(data, indent=1, default=str))
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
