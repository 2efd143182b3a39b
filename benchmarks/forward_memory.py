"""Forward mode's live tensor memory against T, for both engines.

The RSS rise that ``benchmarks/hypergrad_cost.py`` reports includes glibc's heap fragmentation,
which grows with the number of steps when a loop allocates and frees many differently sized
tensors. This script counts live tensor bytes instead: the peak of torch's own allocation and
free events (``hyperdiff.diagnose.check.peak_memory``, the profiler's memory events), for the digits
MLP of ``hypergrad_cost.py`` (minibatches of 100, SGD momentum, k grouped L2 penalties).

    python benchmarks/forward_memory.py        # about 3 minutes

Writes benchmarks/results/forward_memory.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hypergrad_cost import cost_problem

from hyperdiff.diagnose.check import peak_memory
from hyperdiff.methods.forward import forward

RESULTS = Path(__file__).resolve().parent / "results" / "forward_memory.json"


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    print(f"{'engine':<11}{'k':>4}{'T':>6}{'live peak MB':>14}")
    for engine in ("double_vjp", "jvp"):
        for k in (1, 30):
            for steps in (30, 300, 1000):
                problem = cost_problem(steps, k)
                forward(engine=engine)(problem.with_steps(2))  # first-call allocations
                _, peak = peak_memory(lambda p=problem, e=engine: forward(engine=e)(p))
                rows.append({"engine": engine, "k": k, "steps": steps, "live_peak_mb": peak / 2**20})
                print(f"{engine:<11}{k:>4}{steps:>6}{peak / 2**20:>14.2f}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python benchmarks/forward_memory.py",
                                   "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
