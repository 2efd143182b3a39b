"""How well do implicit's stationarity diagnostics predict its bias? Built-in tasks, several T.

For each task and number of inner steps T, the implicit hypergradient (exact solve) is compared
with the exact hypergradient of the T-step training (reverse mode), and printed next to the two
diagnostics that should predict the gap: the relative gradient norm ``||grad L_train(theta_T)||
/ ||grad L_train(theta_0)||`` (test: ``stationarity_tol = 1e-3``) and the relative first-order
change of the validation loss between ``theta_T`` and the stationary point,
``|<v, H^-1 grad L_train>| / L_val`` (test: ``val_change_tol = 1e-5``).

    python benchmarks/implicit_bias.py        # about a minute

Writes benchmarks/results/implicit_bias.json (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import hyperdiff as hd
from hyperdiff.app.tasks import build_task
from hyperdiff.engine.solvers import ConvergenceWarning, exact
from hyperdiff.methods.implicit import implicit

RESULTS = Path(__file__).resolve().parent / "results" / "implicit_bias.json"
CASES = [("ridge_diabetes", 150), ("ridge_diabetes", 1000), ("logistic_cancer", 30),
         ("logistic_cancer", 100), ("logistic_cancer", 300), ("logistic_digits", 100),
         ("logistic_digits", 300), ("logistic_digits", 1000)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"result file (default: {RESULTS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'task':<16}{'T':>6}{'rel. grad':>11}{'rel. val change':>17}{'rel. error':>12}"
          f"{'warns':>7}")
    for name, steps in CASES:
        problem = build_task(name, steps=steps).problems[0]
        unrolled = hd.reverse()(problem)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            result = implicit(exact())(problem)
        d = result.diagnostics
        error = float((result.vector - unrolled.vector).norm() / unrolled.vector.norm())
        warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
        rows.append({"task": name, "steps": steps, "relative_grad_norm": d["relative_grad_norm"],
                     "relative_val_change": d["relative_val_change"], "rel_error": error,
                     "warned": warned})
        print(f"{name:<16}{steps:>6}{d['relative_grad_norm']:>11.1e}"
              f"{d['relative_val_change']:>17.1e}{error:>12.1e}{'yes' if warned else 'no':>7}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"command": "python benchmarks/implicit_bias.py", "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
