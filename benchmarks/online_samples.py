"""The cost of validation samples per online window: samples = 1, 2, 4 on mlp_digits.

Each job is built as ``hyperdiff run`` builds it (``PLANS["online"].build``): mlp_digits online,
200 inner steps, windows of 10, 64 validation rows per sample (``outer.val_batch = 64``), with
the ``curvature`` (the online default), ``reverse`` and ``forward`` methods. Beside them, in the
same process and interleaved, a plain training of the same problem (no hypergradient: the 200
steps under ``torch.no_grad``) gives the cost of one plain step. The table shows the best wall
time per window over ``--repeats`` rounds, that time over the window's plain steps, and over the
same method with one sample. ``reverse (one backward each)`` replaces the one batched
vector-Jacobian product over the samples through reverse's window graph (``methods/segments.py``'s
``sample_grads``, ``torch.autograd.grad(..., is_grads_batched=True)``) by one backward pass per
sample, the alternative it is measured against. Timings on a shared machine are noisy: the best
of several rounds and the ratios within one run are the point.

    OMP_NUM_THREADS=1 python benchmarks/online_samples.py

Writes benchmarks/results/online_samples.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.plans import PLANS
from hyperdiff.engine.training import initial_state, unroll

reverse_module = importlib.import_module("hyperdiff.methods.reverse")  # hd.methods.reverse is
# the constructor, which shadows its module's name
RESULTS = Path(__file__).resolve().parent / "results" / "online_samples.json"
STEPS, WINDOW, VAL_ROWS = 200, 10, 64
BASE = ["task.name=mlp_digits", "outer.mode=online", f"inner.steps={STEPS}",
        f"outer.window={WINDOW}", f"outer.val_batch={VAL_ROWS}", "report.seeds=1"]
METHODS = {"curvature": ["method.name=curvature"], "reverse": ["method.name=reverse"],
           "reverse (one backward each)": ["method.name=reverse"],
           "forward": ["method.name=forward"]}


def one_backward_each(values: list[torch.Tensor], inputs: list[torch.Tensor]
                      ) -> list[list[torch.Tensor]]:
    """``sample_grads`` as one backward pass per sample through the window's graph."""
    last = len(values) - 1
    return [[torch.zeros_like(x) if g is None else g for g, x in zip(torch.autograd.grad(
        value, inputs, allow_unused=True, retain_graph=j < last), inputs, strict=True)]
        for j, value in enumerate(values)]


def online_run(method: str, samples: int) -> float:
    """Seconds of one online run (``loop.run()``) of ``method`` with ``samples``."""
    config = load_config(overrides=[*BASE, *METHODS[method], f"outer.samples={samples}"])
    _, loop = PLANS["online"].build(config)
    original = reverse_module.sample_grads
    if method == "reverse (one backward each)":
        reverse_module.sample_grads = one_backward_each  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        loop.run(progress=False)
        return time.perf_counter() - started
    finally:
        reverse_module.sample_grads = original


def plain_run() -> float:
    """Seconds of the same problem's 200 steps trained plainly (no hypergradient)."""
    _, loop = PLANS["online"].build(load_config(overrides=BASE))
    problem = loop.plan.problem
    hview = problem.hparams.view(problem.raw_tensors(loop.raw))
    started = time.perf_counter()
    with torch.no_grad():
        unroll(problem, hview, initial_state(problem, hview, differentiable=False),
               differentiable=False)
    return time.perf_counter() - started


def best(timings: dict[str, list[float]], key: str, run: Callable[[], float]) -> None:
    try:
        timings.setdefault(key, []).append(run())
    except RuntimeError as err:  # e.g. a batching rule that vmap lacks
        timings[key] = [float("nan")]
        print(f"{key}: failed: {str(err).splitlines()[0]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    timings: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved rounds: the machine's load hits every job
        best(timings, "plain", plain_run)
        for method in args.methods:
            for samples in args.samples:
                best(timings, f"{method} x{samples}",
                     lambda method=method, samples=samples: online_run(method, samples))
    windows = -(-STEPS // WINDOW)
    plain_step = min(timings["plain"]) / STEPS
    rows: list[dict[str, Any]] = []
    print(f"mlp_digits online, {STEPS} steps, window {WINDOW}, {VAL_ROWS} validation rows per "
          f"sample; best of {args.repeats}; plain step {plain_step * 1e3:.3f} ms")
    print(f"{'method':<29}{'samples':>8}{'ms/window':>11}{'x plain':>9}{'x 1 sample':>12}")
    for method in args.methods:
        one = min(timings[f"{method} x{args.samples[0]}"]) / windows
        for samples in args.samples:
            per_window = min(timings[f"{method} x{samples}"]) / windows
            row = {"method": method, "samples": samples, "ms_per_window": per_window * 1e3,
                   "x_plain": per_window / (WINDOW * plain_step), "x_one_sample": per_window / one}
            rows.append(row)
            print(f"{method:<29}{samples:>8}{row['ms_per_window']:>11.1f}"
                  f"{row['x_plain']:>9.2f}{row['x_one_sample']:>12.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "steps": STEPS, "window": WINDOW, "val_rows": VAL_ROWS, "repeats": args.repeats,
        "plain_step_ms": plain_step * 1e3, "rows": rows, "timings_s": timings}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
