"""Implicit differentiation: accuracy against iterations, and CG against the exact solve.

Usage (from the repo root):
  python benchmarks/implicit.py                 # all parts, float64
  python benchmarks/implicit.py --sizes 50 100  # random-feature widths for the scaling part
  python benchmarks/implicit.py --quick         # small sizes, for a smoke run

Problem: multinomial logistic regression on scikit-learn's digits (standardised, 30%
validation), per-feature L2 (``hyperdiff.testing.linear.logistic``), at ``l2 = 1`` for every feature
(scikit-learn's default ``C = 1``, also about the best single value on this split).
``theta*`` is found by Newton's method (digits) or L-BFGS (random features, where Newton's
dense Hessian would dominate the run); each method then runs with ``steps=1`` from ``theta*``
(the lr is 0) so that only the linear solve and the vjps are timed.

1. Digits (64 hyperparameters, 650 parameters): relative error of the hypergradient against
   the exact solve, for CG with ``maxiter`` = 5..400 and the Neumann series with 10..3000
   terms (default step ``1/lambda_max``); then CG with default settings against the exact
   solve (time, error, iterations).
2. Scaling: random Fourier features of digits, ``cos(x W + b)`` with ``D`` features, so
   ``P = 10 D + 10`` parameters and ``D`` hyperparameters; CG (defaults) against the exact
   solve (defaults) up to ``P >= 5000``.

Times are the best of ``--repeats`` runs of the solve phase (``diagnostics["time_solve_s"]``:
the linear solve plus the final vjp; the exact solve includes forming the Hessian from
vmapped Hessian-vector products). The table is printed and written to
``benchmarks/results/implicit.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import hyperdiff as hd
from hyperdiff.engine.solvers import ConvergenceWarning, cg, exact, neumann
from hyperdiff.methods.implicit import implicit
from hyperdiff.testing.linear import Dataset, load_dataset, logistic

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "implicit.json")


def random_features(data: Dataset, width: int, seed: int = 0) -> Dataset:
    """``cos(x W / sqrt(d) + b)``, standardised with the training statistics."""
    g = torch.Generator().manual_seed(seed)
    d = data.x_train.shape[1]
    w = torch.randn(d, width, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = 2 * math.pi * torch.rand(width, generator=g, dtype=torch.float64)
    f_train, f_val = torch.cos(data.x_train @ w + b), torch.cos(data.x_val @ w + b)
    mean, std = f_train.mean(0), f_train.std(0)
    return Dataset((f_train - mean) / std, data.y_train, (f_val - mean) / std, data.y_val)


def lbfgs(lp, iterations: int = 500) -> dict[str, torch.Tensor]:
    """An accurate minimiser for large problems, where Newton's dense Hessian is too costly."""
    params = {k: v.clone().requires_grad_() for k, v in lp.params.items()}
    opt = torch.optim.LBFGS(
        list(params.values()),
        max_iter=iterations,
        tolerance_grad=1e-10,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = lp.full_train_loss(params)
        loss.backward()
        return loss

    opt.step(closure)
    return {k: v.detach() for k, v in params.items()}


def warm_problem(data: Dataset, l2: float, newton: bool = True):
    """The problem started at theta* (lr 0, one step), and the seconds to find theta*."""
    lp = logistic(data, regularization="per_feature", l2=l2)
    started = time.perf_counter()
    theta = lp.solve() if newton else lbfgs(lp)
    seconds = time.perf_counter() - started
    return lp, lp.problem(hd.sgd(0.0), steps=1, params=theta), seconds


def run(method, problem, repeats: int):
    """Best solve time over ``repeats`` runs, and the last result."""
    best, result = math.inf, None
    for _ in range(repeats):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = method(problem)
        best = min(best, result.diagnostics["time_solve_s"])
    return best, result


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def accuracy_curves(problem, reference, cg_iters, neumann_iters) -> list[dict]:
    rows = []
    for k in cg_iters:
        seconds, r = run(implicit(cg(maxiter=k), warn=False), problem, 1)
        rows.append(
            {
                "solver": "cg",
                "iterations": r.diagnostics["iterations"],
                "rel_error": rel(r.vector, reference),
                "residual": r.diagnostics["residual"],
                "time_s": seconds,
            }
        )
    for k in neumann_iters:
        seconds, r = run(implicit(neumann(iterations=k), warn=False), problem, 1)
        rows.append(
            {
                "solver": "neumann",
                "iterations": k,
                "rel_error": rel(r.vector, reference),
                "residual": r.diagnostics["residual"],
                "time_s": seconds,
            }
        )
    return rows


def compare(problem, repeats: int) -> dict:
    """CG (defaults) against the exact solve (defaults) on one problem."""
    run(implicit(exact()), problem, 1)  # warm-up
    exact_s, by_exact = run(implicit(exact()), problem, repeats)
    cg_s, by_cg = run(implicit(cg()), problem, repeats)
    return {
        "params": problem.num_params,
        "hparams": problem.hparams.numel,
        "exact_s": exact_s,
        "cg_s": cg_s,
        "speedup": exact_s / cg_s,
        "cg_iterations": by_cg.diagnostics["iterations"],
        "cg_residual": by_cg.diagnostics["residual"],
        "cg_rel_error": rel(by_cg.vector, by_exact.vector),
        "exact_residual": by_exact.diagnostics["residual"],
        "grad_norm": by_cg.diagnostics["grad_norm"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 500])
    parser.add_argument("--l2", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.repeats = [20, 50], 1

    data = load_dataset("digits")
    _, problem, newton_s = warm_problem(data, args.l2)
    print(
        f"digits: P={problem.num_params}, k={problem.hparams.numel}, l2={args.l2}, "
        f"Newton {newton_s:.2f} s, torch threads {torch.get_num_threads()}"
    )
    headline = compare(problem, args.repeats)
    _, by_exact = run(implicit(exact()), problem, 1)
    cg_iters = [5, 10, 20, 40, 80, 120, 160, 240, 400]
    neumann_iters = [10, 30, 100, 300, 1000, 3000]
    if args.quick:
        cg_iters, neumann_iters = [5, 20, 80], [10, 100]
    curves = accuracy_curves(problem, by_exact.vector, cg_iters, neumann_iters)

    print("\n1. relative error of the hypergradient vs the exact solve (digits)")
    print(f"{'solver':<8} {'iters':>6} {'rel. error':>11} {'residual':>10} {'time (s)':>9}")
    for r in curves:
        print(
            f"{r['solver']:<8} {r['iterations']:>6} {r['rel_error']:>11.2e} "
            f"{r['residual']:>10.2e} {r['time_s']:>9.3f}"
        )
    h = headline
    print(
        f"\ndefaults on digits: exact {h['exact_s']:.3f} s, cg {h['cg_s']:.3f} s "
        f"({h['speedup']:.1f}x), cg {h['cg_iterations']} iterations, "
        f"rel. error {h['cg_rel_error']:.2e}"
    )

    scaling = []
    print("\n2. CG (defaults) vs exact solve (defaults), random features of digits")
    print(
        f"{'D':>5} {'P':>6} {'exact (s)':>10} {'cg (s)':>8} {'speedup':>8} {'cg iters':>9} "
        f"{'cg rel. error':>14}"
    )
    for width in args.sizes:
        _, prob, _ = warm_problem(random_features(data, width), args.l2, newton=False)
        row = {"width": width, **compare(prob, max(1, args.repeats - 1))}
        scaling.append(row)
        print(
            f"{width:>5} {row['params']:>6} {row['exact_s']:>10.3f} {row['cg_s']:>8.3f} "
            f"{row['speedup']:>7.1f}x {row['cg_iterations']:>9} {row['cg_rel_error']:>14.2e}"
        )

    out = {
        "command": "python benchmarks/implicit.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "dtype": "float64",
        "l2": args.l2,
        "digits": {**headline, "curves": curves},
        "scaling": scaling,
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
