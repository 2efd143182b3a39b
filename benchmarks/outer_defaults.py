"""Which outer optimizer should be the default? Candidates x tasks x starts, side by side.

Every candidate runs ``run_experiment`` offline with the default config except the outer
optimizer and its learning rate (``stop.max_steps = 30``, cosine decay, patience 10, the
task's selection split), on the suite's tasks (``benchmarks/suite_tasks/``) from the task's
start and from its learning rate 100x too small and 100x too large. Score: the held-out test
loss of the report's retraining (mean over its 3 seeds) with the run's best values. The current
default (Adam, outer lr 0.05) runs in the same process, so every ratio compares runs made under
the same load; the suite's TPE-100 test losses (``benchmarks/results/suite.json``, measured
earlier) are the second reference.

    OMP_NUM_THREADS=1 nice python benchmarks/outer_defaults.py            # everything
    python benchmarks/outer_defaults.py --tasks logistic_wide --candidates adam signstep
    python benchmarks/outer_defaults.py --tasks mlp_digits reweight_digits --candidates \
        "adam 0.05" signstep recommended "signstep + task lr" --out /tmp/builtin.json
    python benchmarks/outer_defaults.py --merge /tmp/a.json /tmp/builtin.json  # -> --out
    python benchmarks/outer_defaults.py --table benchmarks/results/outer_defaults.json

Writes ``benchmarks/results/outer_defaults.json`` after every run (``runs``: one entry per
candidate x task x start; ``summary``: one per candidate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.tasks import task_defaults

HERE = Path(__file__).parent
TASK_DIR = HERE / "suite_tasks"
RESULTS = HERE / "results"
sys.path.insert(0, str(TASK_DIR))
from suite_common import start_name  # noqa: E402

CANDIDATES: dict[str, dict[str, Any]] = {
    "adam 0.05": {"outer.optimizer": "adam", "outer.lr": 0.05},  # the old default
    "adam 0.2": {"outer.optimizer": "adam", "outer.lr": 0.2},
    "signstep": {"outer.optimizer": "signstep", "outer.lr": 0.05},
    "trust": {"outer.optimizer": "trust", "outer.lr": 0.05},
    "recommended": {},  # a built-in task's own outer settings: see recommended()
    "signstep + task lr": {},  # the same with signstep where the task names no optimizer
    # a global phase of quasi-random points around the start before signstep (global_phase.py)
    "signstep explore 4": {"outer.optimizer": "signstep", "outer.lr": 0.05, "outer.explore": 4},
    "signstep explore 8": {"outer.optimizer": "signstep", "outer.lr": 0.05, "outer.explore": 8},
    "signstep 0.15": {"outer.optimizer": "signstep", "outer.lr": 0.15},
    # no cosine decay: the sign agreement alone sets the step (flips shrink it)
    "signstep constant": {"outer.optimizer": "signstep", "outer.lr": 0.05,
                          "outer.schedule": "constant"},
    "signstep constant explore 4": {"outer.optimizer": "signstep", "outer.lr": 0.05,
                                    "outer.schedule": "constant", "outer.explore": 4},
    # the global phase only after a broken start (step 0 failed or trained no better than the
    # untrained model)
    "signstep constant broken 4": {"outer.optimizer": "signstep", "outer.lr": 0.05,
                                   "outer.schedule": "constant", "outer.explore": 4,
                                   "outer.explore_when": "broken"},
    "signstep constant broken 8": {"outer.optimizer": "signstep", "outer.lr": 0.05,
                                   "outer.schedule": "constant", "outer.explore": 8,
                                   "outer.explore_when": "broken"},
}
BASELINE = "adam 0.05"
TASKS = {"logistic_wide": "logistic_wide", "reweight": "reweight_digits",
         "tabular_mlp": "tabular_mlp", "gru_seq": "gru_seq", "shapes_cnn": "shapes_cnn",
         "char_lm": "char_lm"}
"""Suite task file -> the name the suite's results use."""
CHEAP = ("logistic_wide", "reweight", "tabular_mlp", "gru_seq")
"""The suite tasks run by default (shapes_cnn and char_lm cost 3-4x more per training)."""
BUILT_IN = ("mlp_digits", "reweight_digits", "logistic_cancer", "ridge_diabetes",
            "logistic_digits")
"""Built-in tasks (``--tasks``; no starts off: they run from their own start only)."""
STARTS = (0.01, 1.0, 100.0)
FIXED = {"outer.mode": "offline", "outer.schedule": "cosine", "stop.max_steps": 30}


def run_one(file: str, start: float, overrides: dict[str, Any], workdir: Path,
            fixed: dict[str, Any] = FIXED) -> dict[str, Any]:
    """One offline run; its test loss (report retraining), best selection loss, steps, time."""
    factory = "build" if start == 1.0 else start_name(start)
    name = file if file in BUILT_IN else f"{TASK_DIR / file}.py:{factory}"
    settings = {**fixed, **overrides, "task.name": name}
    started = time.perf_counter()
    trainings: list[int] = []
    try:
        result = run_experiment(
            load_config(overrides=[f"{k}={v}" for k, v in settings.items()]),
            out=workdir, progress=False, log=lambda _message: None,
            callbacks=[lambda _opt, record: trainings.append(record.trainings)])
    except (hd.HyperdiffError, hd.NonFiniteError) as err:
        return {"test_loss": None, "note": f"failed: {err}"[:200],
                "time_s": time.perf_counter() - started}
    return {"test_loss": result["tuned"]["metrics"]["test"]["loss"],
            "test_accuracy": result["tuned"]["metrics"]["test"].get("accuracy"),
            "initial_test_loss": result["initial"]["metrics"]["test"]["loss"],
            "tuned": result["tuned"]["hparams"], "stop_reason": result["stop_reason"],
            "trainings": trainings[-1] if trainings else 0,
            "time_s": time.perf_counter() - started}


def recommended(file: str, optimizer: str = "adam") -> dict[str, Any]:
    """The outer settings a built-in task recommends (``outer.*`` of its defaults), on top of
    ``optimizer`` with lr 0.05 (Adam: the old default); for a suite task, just that."""
    defaults = task_defaults(file) if file in BUILT_IN else {}
    return {"outer.optimizer": optimizer, "outer.lr": 0.05,
            **{k: v for k, v in defaults.items() if k.startswith("outer.")}}


def tpe_reference() -> dict[str, float]:
    """The suite's TPE-100 test loss per task (results name), where it ran."""
    path = RESULTS / "suite.json"
    if not path.exists():
        return {}
    blocks = json.loads(path.read_text())["tasks"]
    return {name: r["test_loss"] for name, block in blocks.items() for r in block["rows"]
            if r["method"] == "tpe-100" and r.get("test_loss") is not None}


def summarize(runs: Sequence[dict[str, Any]], tpe: dict[str, float],
              baseline: str = BASELINE) -> dict[str, Any]:
    """Per candidate: geometric means of test-loss ratios to the baseline (same task and start,
    this run) and to TPE-100; wins / losses / ties (within 1%) against the baseline."""
    base = {(r["task"], r["start"]): r["test_loss"] for r in runs
            if r["candidate"] == baseline and _finite(r["test_loss"])}
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["candidate"] for r in runs):
        mine = [r for r in runs if r["candidate"] == name]
        vs_base = [r["test_loss"] / base[(r["task"], r["start"])] for r in mine
                   if (r["task"], r["start"]) in base and _finite(r["test_loss"])]
        vs_tpe = [r["test_loss"] / tpe[TASKS[r["task"]]] for r in mine
                  if TASKS.get(r["task"]) in tpe and _finite(r["test_loss"])]
        out[name] = {"runs": len(mine), "failed": sum(not _finite(r["test_loss"]) for r in mine),
                     "geomean_vs_baseline": _geomean(vs_base), "geomean_vs_tpe100": _geomean(vs_tpe),
                     "wins": sum(x < 0.99 for x in vs_base), "losses": sum(x > 1.01 for x in vs_base),
                     "ties": sum(0.99 <= x <= 1.01 for x in vs_base),
                     "worst_vs_baseline": max(vs_base, default=None)}
    return out


def _geomean(xs: Sequence[float]) -> float | None:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def _num(x: Any, fmt: str) -> str:
    return "-" if not _finite(x) else format(x, fmt)


def table(data: dict[str, Any]) -> str:
    """Runs as a task x start grid of test losses per candidate, then the summary."""
    runs, tpe, baseline = data["runs"], data["tpe100"], data.get("baseline", BASELINE)
    names = list(dict.fromkeys(r["candidate"] for r in runs))
    keys = list(dict.fromkeys((r["task"], r["start"]) for r in runs))
    loss = {(r["candidate"], r["task"], r["start"]): r["test_loss"] for r in runs}
    head = ["task", "start", *names, "tpe-100 (suite)"]
    lines = [[task, f"x{start:g}", *(_num(loss.get((n, task, start)), ".4f") for n in names),
              _num(tpe.get(TASKS.get(task, "")), ".4f")] for task, start in keys]
    out = ["test loss (report retraining, mean of 3 seeds)", " | ".join(head)]
    out += [" | ".join(line) for line in lines]
    out += ["", f"summary (ratios: geometric mean; wins/losses vs {baseline}, ties within 1%)",
            "candidate | runs | failed | vs " + baseline + " | vs tpe-100 | wins | losses | "
            "ties | worst vs " + baseline]
    for name, e in data["summary"].items():
        out.append(" | ".join([name, str(e["runs"]), str(e["failed"]),
                               _num(e["geomean_vs_baseline"], ".3f"),
                               _num(e["geomean_vs_tpe100"], ".3f"), str(e["wins"]),
                               str(e["losses"]), str(e["ties"]),
                               _num(e["worst_vs_baseline"], ".3f")]))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(CHEAP),
                        choices=[*TASKS, *BUILT_IN])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES)[:4],
                        choices=list(CANDIDATES))
    parser.add_argument("--starts", nargs="+", type=float, default=list(STARTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "outer_defaults.json")
    parser.add_argument("--baseline", default=BASELINE, choices=list(CANDIDATES),
                        help="the candidate every ratio is taken against")
    parser.add_argument("--max-steps", type=int, default=FIXED["stop.max_steps"],
                        help="outer steps per run (stop.max_steps)")
    parser.add_argument("--table", type=Path, help="print the tables of a results file")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="combine the runs of these results files into --out")
    args = parser.parse_args(argv)
    if args.merge:
        loaded = [json.loads(path.read_text()) for path in args.merge]
        runs = [r for data in loaded for r in data["runs"]]
        merged = {**loaded[0], "runs": runs,
                  "summary": summarize(runs, loaded[0]["tpe100"],
                                       loaded[0].get("baseline", BASELINE))}
        args.out.write_text(json.dumps(merged, indent=1, default=str))
        args.table = args.out
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    tpe, runs = tpe_reference(), []
    fixed = {**FIXED, "stop.max_steps": args.max_steps}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for file in args.tasks:
            # reweight has no lr to start off; built-in tasks have no factories for it
            starts = [1.0] if file == "reweight" or file in BUILT_IN else args.starts
            for start in starts:
                for name in args.candidates:
                    work = Path(tmp) / f"{file}-{start:g}-{name.replace(' ', '_')}"
                    outer = (recommended(file) if name == "recommended" else
                             recommended(file, "signstep") if name == "signstep + task lr"
                             else CANDIDATES[name])
                    runs.append({"candidate": name, "task": file, "start": start, **outer,
                                 **run_one(file, start, outer, work, fixed)})
                    r = runs[-1]
                    print(f"[{time.perf_counter() - began:7.1f} s] {file} x{start:g} {name}: "
                          f"test loss {_num(r['test_loss'], '.4f')} in {r['time_s']:.1f} s",
                          flush=True)
                    data = {"settings": fixed, "baseline": args.baseline, "tpe100": tpe,
                            "score": "held-out test loss, report retraining (3 seeds)",
                            "runs": runs, "summary": summarize(runs, tpe, args.baseline)}
                    args.out.write_text(json.dumps(data, indent=1, default=str))
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
