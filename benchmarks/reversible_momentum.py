"""Reversible mode with a momentum that is not a multiple of 2^-31 (0.9).

Reversible mode multiplies the velocity by the fraction ``n / d`` closest to mu with
``d <= 2^31`` (9 / 10 for 0.9; earlier versions used ``round(mu 2^31) / 2^31``, which runs 0.9
as 0.8999999999068677), and its backward pass differentiates exactly that training. This
script measures, in float64 on the logistic-regression problem of
``tests/test_long_horizon.py`` (21 parameters, 4 minibatches, SGD momentum, L2 penalty), the
relative difference of reversible mode's hypergradient from

- reverse mode at momentum ``n / d`` (the training reversible mode ran): fixed-point rounding;
- reverse mode at momentum 0.9: that plus the effect of any momentum rounding,

for a constant momentum, a momentum hyperparameter, and T in {100, 1000}. It prints a table
and writes ``benchmarks/results/inputs.json`` (``--out``: elsewhere). About 30 s on 2 shared
cores.

    python benchmarks/reversible_momentum.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import hyperdiff as hd
from hyperdiff.methods.reversible import quantised

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_long_horizon import _logistic_problem

RESULTS = Path(__file__).resolve().parent / "results" / "inputs.json"
STEPS = (100, 1000)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"result file (default: {RESULTS})")
    args = parser.parse_args(argv)
    rows = []
    q = quantised(0.9)
    forms = {
        "constant momentum": lambda m: (hd.sgd("lr", m), hd.HyperParameters(
            lr=hd.scalar(0.2), wd=hd.scalar(1e-2))),
        "momentum hyperparameter": lambda m: (hd.sgd("lr", "mom"), hd.HyperParameters(
            lr=hd.scalar(0.2), mom=hd.scalar(m, (0.0, 1.0)), wd=hd.scalar(1e-2))),
    }
    for form, make in forms.items():
        for steps in STEPS:
            opt, hp = make(0.9)
            problem = _logistic_problem(steps, optimizer=opt, hparams=hp)[0]
            got = hd.reversible()(problem)
            at_mu = hd.reverse()(problem).vector
            opt_q, hp_q = make(q)
            at_q = hd.reverse()(_logistic_problem(steps, optimizer=opt_q, hparams=hp_q)[0]).vector
            rows.append({"form": form, "steps": steps,
                         "momentum_rounding": got.diagnostics["momentum_rounding"],
                         "vs_reverse_at_n_over_d": rel(got.vector, at_q),
                         "vs_reverse_at_0.9": rel(got.vector, at_mu)})
    print(f"{'form':<26}{'T':>6}{'|mu - n/d|':>12}{'vs reverse(n/d)':>17}{'vs reverse(0.9)':>17}")
    for r in rows:
        print(f"{r['form']:<26}{r['steps']:>6}{r['momentum_rounding']:>12.2g}"
              f"{r['vs_reverse_at_n_over_d']:>17.2g}{r['vs_reverse_at_0.9']:>17.2g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"reversible_momentum_0.9": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
