"""Forward mode's live tensor memory against T, for both engines.

The RSS rise that ``benchmarks/hypergrad_cost.py`` reports includes glibc's heap fragmentation,
which grows with the number of steps when a loop allocates and frees many differently sized
tensors. This script counts live tensor bytes instead: the peak of torch's own allocation and
free events (``hyperdiff.diagnose.check.peak_memory``, the profiler's memory events), for the digits
MLP of ``hypergrad_cost.py`` (minibatches of 100, SGD momentum, k grouped L2 penalties).

    python benchmarks/forward_memory.py        # about 3 minutes

Writes benchmarks/results/forward_memory.json (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hypergrad_cost import cost_problem

from hyperdiff.diagnose.check import peak_memory
from hyperdiff.methods.forward import forward

RESULTS = Path(__file__).resolve().parent / "results" / "forward_memory.json"
ENGINES = ("double_vjp", "jvp")
KS = (1, 30)  # hyperparameters
STEPS = (30, 300, 1000)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"result file (default: {RESULTS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'engine':<11}{'k':>4}{'T':>6}{'live peak MB':>14}")
    for engine in ENGINES:
        for k in KS:
            for steps in STEPS:
                problem = cost_problem(steps, k)
                forward(engine=engine)(problem.with_steps(2))  # first-call allocations
                _, peak = peak_memory(lambda p=problem, e=engine: forward(engine=e)(p))
                rows.append({"engine": engine, "k": k, "steps": steps, "live_peak_mb": peak / 2**20})
                print(f"{engine:<11}{k:>4}{steps:>6}{peak / 2**20:>14.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python benchmarks/forward_memory.py",
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
