"""Whole-job wall time under torchrun: one process against 2 ranks, side by side.

Runs ``hyperdiff run --task mlp_digits --set outer.samples=4 --set stop.max_steps=20`` (the
target of issue 19, item 5) as one process and as ``torchrun --standalone --nproc_per_node 2``
(``python -m torch.distributed.run``), alternating, ``--repeats`` times each, in fresh
processes, and keeps the best wall time of each. Each run's stderr lines are time-stamped as
they arrive, so the table also splits the wall time into phases: start-up (until the
"tuning ..." line: imports, torchrun's agent, the process group, the task), the outer steps
(``time_s`` of result.json), and the rest (final report, writing, exit), and the CPU seconds
of all the run's processes (torchrun's agent and the ranks together). It checks that the
2-rank history and result equal the single-process ones (<= 1e-10; timing fields and the run
directory aside). Target: 2 ranks in at most 1/1.3 of the single process's wall time.

The load average (``/proc/loadavg``) before and after is recorded: on a shared machine the
timings swing with the other jobs' load.

    python benchmarks/torchrun_wall.py [--repeats 3] [--steps 20] [--samples 4] [--out JSON]

prints a table and writes ``benchmarks/results/torchrun_wall.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hyperdiff.app.rundir import RunDir

OUT = Path(__file__).parent / "results" / "torchrun_wall.json"
TARGET = 1.3


def command(world: int, out: Path, steps: int, samples: int) -> list[str]:
    """The ``hyperdiff run`` command line, under torchrun for ``world > 1``."""
    run = ["-m", "hyperdiff", "run", "--task", "mlp_digits", "--set", f"outer.samples={samples}",
           "--set", f"stop.max_steps={steps}", "--out", str(out)]
    if world == 1:
        return [sys.executable, *run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", *run]


def timed_run(world: int, out: Path, steps: int, samples: int) -> dict[str, Any]:
    """One run: its wall time, the time its "tuning ..." line appeared, the phases, and the
    CPU seconds of all its processes (torchrun's agent and ranks)."""
    cpu = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(command(world, out, steps, samples),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tuning = math.nan
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "tuning mlp_digits" in line and math.isnan(tuning):
            tuning = time.perf_counter() - started
    code = proc.wait()
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{world} rank(s) exited with {code}:\n{''.join(lines[-30:])}")
    result = json.loads((out / "result.json").read_text())
    return {"wall_s": wall, "startup_s": tuning, "outer_s": result["time_s"],
            "rest_s": wall - tuning - result["time_s"], "cpu_s": _children_cpu() - cpu}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def history(out: Path) -> list[dict[str, Any]]:
    return [r.without_timing() for r in RunDir(out).read_history()]


def largest_difference(a: Any, b: Any) -> float:
    """The largest absolute difference between two nested JSON values (inf if the structures
    or the non-numbers differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return math.inf
        return max((largest_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        return max((largest_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return 0.0 if a == b else abs(a - b)
    return 0.0 if a == b else math.inf


def comparable_result(out: Path) -> dict[str, Any]:
    """result.json without its timing and with its run directory (which a warning may name)
    replaced by ``RUN_DIR``."""
    result = json.loads((out / "result.json").read_text().replace(str(out), "RUN_DIR"))
    return {k: v for k, v in result.items() if k not in ("time_s", "run_dir")}


def load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON file to write")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    before = load()
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    differences = {"history": 0.0, "result": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            outs = {}
            for world in (1, 2):
                outs[world] = Path(tmp) / f"w{world}-{repeat}"
                runs[world].append(timed_run(world, outs[world], args.steps, args.samples))
            differences["history"] = max(differences["history"], largest_difference(
                history(outs[1]), history(outs[2])))
            differences["result"] = max(differences["result"], largest_difference(
                comparable_result(outs[1]), comparable_result(outs[2])))
    after = load()
    best = {w: min(rs, key=lambda r: r["wall_s"]) for w, rs in runs.items()}
    ratio = best[1]["wall_s"] / best[2]["wall_s"]
    print(f"hyperdiff run --task mlp_digits, outer.samples={args.samples}, "
          f"stop.max_steps={args.steps}; best of {args.repeats} alternating runs; "
          f"load average {before[0]:.1f} before, {after[0]:.1f} after")
    print(f"{'':<10}{'wall s':>9}{'start-up s':>12}{'outer s':>9}{'rest s':>8}{'CPU s':>8}"
          "   all walls")
    for world in (1, 2):
        b = best[world]
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in runs[world])
        print(f"{f'{world} rank(s)':<10}{b['wall_s']:>9.2f}{b['startup_s']:>12.2f}"
              f"{b['outer_s']:>9.2f}{b['rest_s']:>8.2f}{b['cpu_s']:>8.2f}   {walls}")
    print(f"speed-up {ratio:.2f}x (target {TARGET}x: "
          f"{'met' if ratio >= TARGET else 'not met'}); largest difference 2 ranks vs 1: "
          f"history {differences['history']:.1e}, result {differences['result']:.1e}")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(command(2, Path("OUT"), args.steps, args.samples)[1:]),
        "repeats": args.repeats, "loadavg_before": before, "loadavg_after": after,
        "runs": {str(w): rs for w, rs in runs.items()},
        "best": {str(w): b for w, b in best.items()}, "speedup": ratio, "target": TARGET,
        "largest_difference": differences, "cpus": os.cpu_count(),
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
