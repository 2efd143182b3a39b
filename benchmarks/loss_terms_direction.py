"""How well ``curvature``'s loss-term signal points, against exact reverse mode.

For hyperparameters the train loss reads itself (per-feature penalties, example weights, a ridge
penalty), the offline hypergradient of ``hd.methods.curvature(loss_terms=...)`` for each mode
against ``hd.reverse()`` through the whole training, at the task's start values with the tuned
hyperparameter scaled by each ``--factors``: the cosine of the two vectors and the ratio of
their norms (docs/online.md, "Loss-term hyperparameters over more than one step").

    OMP_NUM_THREADS=1 python benchmarks/loss_terms_direction.py \
        --out benchmarks/results/loss_terms_direction.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import hyperdiff as hd

HERE = Path(__file__).parent
CASES = (  # (task reference, the hyperparameter the train loss reads, factors)
    (str(HERE / "suite_tasks" / "logistic_wide.py") + ":build", "l2", (1.0, 100.0)),
    (str(HERE / "suite_tasks" / "reweight.py") + ":build", "weight", (1.0,)),
    ("ridge_diabetes", "lam", (1.0, 100.0, 600.0)),
)
MODES = ("last", "window")


def compare(ref: str, name: str, factor: float) -> dict[str, Any]:
    """The modes' ``name`` hypergradients against reverse mode's, at the start scaled by
    ``factor``."""
    task = hd.tasks.build_task(ref)
    problem = task.problems[0]
    start = problem.hparams.natural()[name]
    raw = problem.hparams.with_natural(**{name: start * factor}).raw
    exact = hd.reverse()(problem, raw).grad[name].flatten().double()
    row: dict[str, Any] = {"task": task.name, "hparam": name, "factor": factor,
                           "exact_norm": float(exact.norm())}
    if exact.numel() == 1:
        row["exact"] = float(exact)
    for mode in MODES:
        got = hd.methods.curvature(loss_terms=mode)(problem, raw).grad[name].flatten().double()
        row[mode] = {"cosine": float(got @ exact / (got.norm() * exact.norm())),
                     "norm_ratio": float(got.norm() / exact.norm())}
        if got.numel() == 1:
            row[mode]["value"] = float(got)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "loss_terms_direction.json")
    args = parser.parse_args()
    rows = []
    print("| task | hyperparameter | start x | " + " | ".join(
        f"{m}: cosine | {m}: norm ratio" for m in MODES) + " |")
    print("|---|---|---|" + "---|---|" * len(MODES))
    for ref, name, factors in CASES:
        for factor in factors:
            row = compare(ref, name, factor)
            rows.append(row)
            print(f"| {row['task']} | {name} | {factor:g} | " + " | ".join(
                f"{row[m]['cosine']:.3f} | {row[m]['norm_ratio']:.3g}" for m in MODES) + " |",
                flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
