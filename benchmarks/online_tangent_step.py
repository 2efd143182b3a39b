"""What the curvature tangents cost per tuned training step, counted and timed on each suite task.

The ``curvature`` window advances its tangents at every tuned step: the rule's values (flat
gradient, parameters, moments, coefficients) and its in-place recurrence
(``methods/curvature.py``, ``methods/curvature_adam.py``). For each suite task at its start this
counts the tensor operations of one such step (torch.profiler's top-level ``aten::`` calls,
deterministic) and times it (best of ``--repeats`` rounds of ``--number`` steps, CPU time) beside
one plain training step at the same state (the train gradient and the optimizer's update),
measured in the same process. Run it on two versions of the code (``PYTHONPATH``) to compare
them: the counts are exact, the times noisy on a shared machine.

    OMP_NUM_THREADS=1 python benchmarks/online_tangent_step.py --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suite_tasks"))

from suite import TASK_DIR, TASKS  # noqa: E402

from hyperdiff.app.config import load_config  # noqa: E402
from hyperdiff.app.plans import build_online  # noqa: E402
from hyperdiff.engine.training import initial_state, train_gradient  # noqa: E402

# the module, not the function hyperdiff.methods re-exports under the same name
curvature = importlib.import_module("hyperdiff.methods.curvature")


def best_us(fn: Any, number: int, repeats: int) -> float:
    """Fastest CPU microseconds per call of ``fn`` over ``repeats`` rounds of ``number``."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(number):
            fn()
        best = min(best, (time.process_time() - started) / number)
    return best * 1e6


def task_step(name: str, number: int, repeats: int) -> dict[str, Any]:
    """One task's tangent step: its operations and CPU time, beside a plain step's."""
    overrides = [f"task.name={TASK_DIR / name}.py:build", "outer.mode=online"]
    _, loop = build_online(load_config(overrides=overrides))
    problem = loop.plan.problem
    raw = problem.raw_tensors(loop.raw)
    hview = problem.hparams.view(raw)
    params, buffers, opt_state = initial_state(problem, hview, differentiable=False)
    step = 3
    theta = {k: v.detach().requires_grad_() for k, v in params.items()}
    grads, _, _ = train_gradient(problem, theta, buffers, hview, step, create_graph=False)
    with torch.no_grad():
        _, new_state = problem.optimizer.update(grads, opt_state, params, hview, step)
    rule = curvature.rule_for(problem)
    tangent = rule.initial(problem, raw)
    coefs = curvature._window_coefficients(problem, raw, step, step + 5)
    no_rows = tangent.z.shape[0] == 0 and hasattr(rule, "average")

    def tangent_step() -> None:
        with torch.no_grad():
            if no_rows:  # the squared-gradient average alone (since s30)
                rule.average(problem, hview, grads, params, tangent, step)
                return
            values = rule.values(problem, hview, grads, params, opt_state, new_state, step)
            rule.advance(tangent, values, coefs.lrs[0], coefs.dlrs[0], 0.998, 32.0, 5)
            if coefs.dwds is not None:
                rule.decay(tangent, values, coefs.lrs[0], coefs.dwds[0])

    def plain_step() -> None:
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        g, _, _ = train_gradient(problem, leaves, buffers, hview, step, create_graph=False)
        with torch.no_grad():
            problem.optimizer.update(g, opt_state, params, hview, step)

    tangent_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tangent_step()
    ops = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    tangent_us = best_us(tangent_step, number, repeats)
    plain_us = best_us(plain_step, max(1, number // 4), repeats)
    return {"task": name, "rows": int(tangent.z.shape[0]), "entries": int(tangent.z.shape[1]),
            "parameter_tensors": len(params), "ops": len(ops),
            "ops_by_name": dict(collections.Counter(ops).most_common()),
            "tangent_step_us": tangent_us, "plain_step_us": plain_us,
            "over_plain_step": tangent_us / plain_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--number", type=int, default=40, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=15, help="best of this many rounds")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "online_tangent_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [task_step(name, args.number, args.repeats) for name in args.tasks]
    print("| task | rows x entries (tensors) | ops per step | tangent step (us) | plain step (us) "
          "| over a plain step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['rows']} x {r['entries']} ({r['parameter_tensors']}) | "
              f"{r['ops']} | {r['tangent_step_us']:.1f} | {r['plain_step_us']:.1f} | "
              f"{r['over_plain_step']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "number": args.number,
                                    "repeats": args.repeats, "tasks": rows}, indent=1))


if __name__ == "__main__":
    main()
