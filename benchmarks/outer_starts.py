"""Offline rules for starts far off, side by side over seeds: ``outer.explore_when``, ``stop.travel``.

Every run is ``run_experiment`` offline with the default config (signstep, constant schedule,
30 outer steps, patience 10, 8 points) except the candidate's keys (:data:`CANDIDATES`) and
``outer.seed``, on the suite's tasks (``benchmarks/suite_tasks/``) from the task's start and its
learning rate 10x and 100x off. Score: the held-out test loss of the report's retraining (mean
over its 3 seeds) at the run's best values. Two shortcuts write a row without running it
(``"same_as"``): ``weak`` and ``broken`` differ only in the decision taken at step 0, so where
``weak`` does not run the phase its run is the ``broken`` run step for step
(``tests/test_weak_start.py``); ``stop.travel`` only holds early stopping back, so a run of the
baseline (``--baseline``) that ended on its budget is the ``travel`` run step for step
(``tests/test_travel.py``), and ``stop.extend`` only holds the budget back, so a run of the
baseline that stopped early is the ``extend`` run step for step (``tests/test_extend.py``).
``--reuse FILE`` takes the rows already in FILE (same candidate,
task, start and seed: the test loss does not depend on the machine's load) instead of running
them.

    OMP_NUM_THREADS=1 nice python benchmarks/outer_starts.py --tasks tabular_mlp gru_seq \
        --starts 0.01 0.1 1 --seeds 0 1 2 --out /tmp/starts.json
    OMP_NUM_THREADS=1 nice python benchmarks/outer_starts.py --tasks tabular_mlp \
        --starts 0.1 1 --seeds 0 1 2 --candidates weak "travel 3" --baseline weak
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

CANDIDATES: dict[str, dict[str, Any]] = {
    "broken": {"outer.explore_when": "broken", "stop.travel": 0},
    "weak": {"outer.explore_when": "weak", "stop.travel": 0},  # the default until s28
    # early stopping does not count steps in which a value still travels (stopping.py); 3: the
    # default since s28
    "travel 3": {"outer.explore_when": "weak", "stop.travel": 3},
    "travel 2": {"outer.explore_when": "weak", "stop.travel": 2},
    # s30: the budget waits up to 20 steps for a value that still travels (stopping.py)
    "extend 20": {"outer.explore_when": "weak", "stop.travel": 3, "stop.extend": 20},
    # s30: a new best is trained once more on another minibatch seed and ranked by the mean
    # (tuner/confirm.py)
    "confirm 1": {"outer.explore_when": "weak", "stop.travel": 3, "outer.confirm": 1},
}
"""Candidate name -> its config keys (on top of :data:`FIXED` and the defaults)."""
BASELINE = "broken"
STARTS = (0.01, 0.1, 1.0, 10.0, 100.0)
FIXED = {"outer.mode": "offline", "stop.max_steps": 30}


def phase_ran(workdir: Path) -> bool:
    """Whether the run in ``workdir`` tried the global phase's points (its history says so)."""
    lines = (workdir / "history.jsonl").read_text().splitlines()
    return any("global phase: point" in json.loads(line)["message"] for line in lines)


def table(data: dict[str, Any]) -> str:
    """Test loss per task x start: each candidate's loss per seed (``-``: not run) and its mean
    over the seeds that every candidate ran, and the ratios of those means to the baseline's."""
    runs, baseline = data["runs"], data.get("baseline", BASELINE)
    names = list(dict.fromkeys(r["candidate"] for r in runs))
    names = [baseline, *(n for n in names if n != baseline)] if baseline in names else names
    others = names[1:]
    keys = sorted(dict.fromkeys((r["task"], r["start"]) for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    out = ["test loss (report retraining, mean of 3 seeds) per outer.seed "
           f"{' / '.join(map(str, seeds))}; * = the phase ran, = the run of a shortcut (module "
           "doc); mean over the seeds all ran",
           "task | start | " + " | ".join(f"{c} (seeds) | {c} mean" for c in names)
           + "".join(f" | {c} / {names[0]}" for c in others)]
    per_row: dict[str, list[float]] = {}
    for task, start in keys:
        found = {(r["candidate"], r["seed"]): r for r in runs
                 if (r["task"], r["start"]) == (task, start)}
        common = [s for s in seeds if all(_finite(found.get((n, s), {}).get("test_loss"))
                                          for n in names)]
        cells, means = [], {}
        for name in names:
            row = [found.get((name, s)) for s in seeds]
            losses = [found[(name, s)]["test_loss"] for s in common]
            means[name] = sum(losses) / len(losses) if losses else math.nan
            cells += [" / ".join("-" if r is None else _num(r["test_loss"])
                                 + ("*" if r.get("phase") else "")
                                 + ("=" if r.get("same_as") else "") for r in row),
                      _num(means[name])]
        ratios = [means[c] / means[names[0]] if means[names[0]] else math.nan for c in others]
        for name, ratio in zip(others, ratios, strict=True):
            per_row.setdefault(name, []).append(ratio)
        out.append(" | ".join([task, f"x{start:g}", *cells, *(_num(r, ".3f") for r in ratios)]))
    for name, ratios in per_row.items():
        finite = [r for r in ratios if _finite(r)]
        mean = math.exp(sum(map(math.log, finite)) / len(finite)) if finite else math.nan
        out.append(f"{name} / {names[0]}: geometric mean {_num(mean, '.3f')} over {len(finite)} "
                   f"rows; {sum(r < 0.99 for r in finite)} lower, {sum(r > 1.01 for r in finite)}"
                   " higher (by more than 1%)")
    return "\n".join(out)


def shortcut(name: str, row_runs: dict[str, dict[str, Any]], baseline: str) -> str | None:
    """The candidate whose run (already made for this task, start and seed: ``row_runs``)
    ``name``'s run repeats step for step, or ``None`` (module doc)."""
    weak = row_runs.get("weak")
    if name == "broken" and weak is not None and weak.get("phase") is False:
        return "weak"
    base, mine, theirs = row_runs.get(baseline), CANDIDATES[name], CANDIDATES.get(baseline, {})
    differ = {k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k)}
    travel_only = differ == {"stop.travel"} and theirs.get("stop.travel") == 0
    if travel_only and base is not None and str(base.get("stop_reason")).startswith("budget"):
        return baseline
    extend_only = differ == {"stop.extend"} and not theirs.get("stop.extend")
    if extend_only and base is not None and str(base.get("stop_reason")).startswith("early"):
        return baseline
    return None


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
    parser.add_argument("--candidates", nargs="+", default=["broken", "weak"],
                        choices=list(CANDIDATES))
    parser.add_argument("--baseline", default=BASELINE, choices=list(CANDIDATES),
                        help="the candidate every ratio is taken against")
    parser.add_argument("--reuse", type=Path, nargs="+", default=[],
                        help="results files whose rows are taken instead of running them")
    parser.add_argument("--reuse-only", action="store_true",
                        help="run nothing: write the reused rows and their shortcuts")
    parser.add_argument("--out", type=Path, default=RESULTS / "outer_starts.json")
    parser.add_argument("--table", type=Path, help="print the table of a results file")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="combine the runs of these results files into --out (a row "
                        "that several hold: the last file's)")
    args = parser.parse_args(argv)
    if args.merge:
        loaded = [json.loads(path.read_text()) for path in args.merge]
        rows = {(r["candidate"], r["task"], r["start"], r["seed"]): r
                for data in loaded for r in data["runs"]}  # a row once: the last file's
        merged = {**loaded[-1], "runs": list(rows.values())}
        args.out.write_text(json.dumps(merged, indent=1, default=str))
        args.table = args.out
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    runs: list[dict[str, Any]] = []
    reused = {(r["candidate"], r["task"], r["start"], r["seed"]): r
              for path in args.reuse for r in json.loads(path.read_text())["runs"]}
    began = time.perf_counter()
    # weak and the baseline first: the shortcuts of the others read their runs
    order = sorted(args.candidates, key=lambda c: (c != "weak", c != args.baseline))
    with tempfile.TemporaryDirectory() as tmp:
        for file in args.tasks:
            starts = [1.0] if file == "reweight" else args.starts
            for start in starts:
                for seed in args.seeds:
                    row_runs: dict[str, dict[str, Any]] = {}
                    for name in order:
                        row = {"candidate": name, "task": file, "start": start, "seed": seed}
                        same = shortcut(name, row_runs, args.baseline)
                        if (name, file, start, seed) in reused:
                            runs.append({**reused[(name, file, start, seed)], **row})
                        elif same is not None:
                            runs.append({**row_runs[same], **row, "same_as": same})
                        elif args.reuse_only:
                            continue
                        else:
                            work = Path(tmp) / f"{file}-{start:g}-{seed}-{name}"
                            found = run_one(file, start, {**CANDIDATES[name], "outer.seed": seed},
                                            work, FIXED)
                            ran = phase_ran(work) if work.exists() else None
                            runs.append({**row, **found, "phase": ran})
                        r = row_runs[name] = runs[-1]
                        print(f"[{time.perf_counter() - began:7.1f} s] {file} x{start:g} "
                              f"seed {seed} {name}: test loss {_num(r['test_loss'])}"
                              f"{' (phase)' if r.get('phase') else ''} {r.get('stop_reason')}",
                              flush=True)
                        data = {"settings": FIXED, "baseline": args.baseline,
                                "candidates": {c: CANDIDATES[c] for c in args.candidates},
                                "score": "held-out test loss, report retraining (3 seeds)",
                                "runs": runs}
                        args.out.write_text(json.dumps(data, indent=1, default=str))
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
