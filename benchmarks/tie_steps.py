"""Do tied steps (``outer.tie_steps``) and cross-validation lower the held-out test loss?

For ``logistic_digits`` (64 per-feature L2 penalties) and ``logistic_cancer`` (30), each
case is ``hyperdiff run --task TASK`` with the task's defaults and the overrides listed below
(``task.data_seed``, ``outer.tie_steps``, ``task.cv_folds``), run through the library
(``experiment.build`` + ``HyperOptimizer.run``); the tuned values are retrained on the report's
3 fresh seeds and scored on the test split, exactly as ``hyperdiff run`` reports them. For
the data-seed-0 runs of ``logistic_digits`` the test loss at every outer step's values is
also recorded (same seeds), to tell whether a later step would have done better on test
than the one the selection rule picked. Losses are deterministic; times are not reported.

    OMP_NUM_THREADS=1 python benchmarks/tie_steps.py        # 3-10 min on a shared 2-core machine
    OMP_NUM_THREADS=1 python benchmarks/tie_steps.py --tasks logistic_digits \
        --set outer.optimizer=adam --set outer.lr=0.5 --out /tmp/digits.json

Writes benchmarks/results/tie_steps.json (or ``--out``). ``--set KEY=VALUE`` overrides go into
every case's config: the recorded results ran the outer defaults before signstep (Adam, and the
task's outer lr: 0.5 on logistic_digits, 0.2 on logistic_cancer); ``--tasks`` keeps the cases
of some tasks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hyperdiff.app.cli.compare import evaluate_values
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import build
from hyperdiff.seeds import REPORT_SEED

RESULTS = Path(__file__).parent / "results" / "tie_steps.json"
SEEDS = tuple(REPORT_SEED + i for i in range(3))
CASES: list[tuple[str, int, int | None, int | None, bool]] = (
    # (task, data_seed, tie_steps, cv_folds, per-step test losses); None: the task's default
    [("logistic_digits", 0, tie, cv, True) for cv in (None, 0) for tie in (None, 0)]
    + [("logistic_digits", s, tie, None, False) for s in (1, 2, 3) for tie in (None, 0)]
    + [("logistic_cancer", s, tie, None, False) for s in range(4) for tie in (None, 8)]
)


def run_case(task_name: str, seed: int, tie: int | None, cv: int | None, per_step: bool,
             extra: tuple[str, ...] = ()) -> dict:
    overrides = [f"task.name={task_name}", f"task.data_seed={seed}", *extra]
    overrides += [] if tie is None else [f"outer.tie_steps={tie}"]
    overrides += [] if cv is None else [f"task.cv_folds={cv}"]
    config = load_config(overrides=overrides)
    task, driver = build(config)
    outcome = driver.run()
    test = task.evaluate(outcome.best_raw, seeds=SEEDS)["test"]
    row = {"task": task_name, "data_seed": seed, "tie_steps": config.outer.tie_steps,
           "cv_folds": config.task.cv_folds, "overrides": overrides, "steps": outcome.steps,
           "best_step": outcome.best_step, "criterion": outcome.criterion,
           "test_loss": test["loss"], "test_accuracy": test.get("accuracy")}
    if per_step:
        row["test_loss_by_step"] = [
            evaluate_values(task, record.hparams, SEEDS)["test"]["loss"]
            if record.status == "ok" else None for record in outcome.history
        ]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every case (repeatable)")
    parser.add_argument("--tasks", nargs="+", default=sorted({case[0] for case in CASES}),
                        choices=sorted({case[0] for case in CASES}))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'task':<16}{'seed':>5}{'tie':>5}{'cv':>4}{'best step':>10}{'test loss':>11}")
    for case in (case for case in CASES if case[0] in args.tasks):
        row = run_case(*case, extra=tuple(args.set))
        rows.append(row)
        print(f"{row['task']:<16}{row['data_seed']:>5}{row['tie_steps']:>5}{row['cv_folds']:>4}"
              f"{row['best_step']:>10}{row['test_loss']:>11.4f}", flush=True)
        if "test_loss_by_step" in row:
            print("  test loss by step: " + " ".join(
                "-" if t is None else f"{t:.4f}" for t in row["test_loss_by_step"]), flush=True)
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/tie_steps.py",
                        "--tasks", *args.tasks, *(f"--set {item}" for item in args.set)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(
        {"command": command, "report_seeds": SEEDS, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
