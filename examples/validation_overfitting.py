"""How much do the defaults guard against overfitting the validation split?

Runs a long tuning job with a constant outer learning rate and no early stopping, and
retrains at every step's hyperparameters to measure the held-out test loss (which tuning never
sees). Then compares the test loss of the hyperparameters each selection rule would return:

- ``best val``: the step with the lowest loss on the split the hypergradient uses;
- ``best selection``: the lowest loss on the held-out selection split (the default rule);
- ``early stop``: the default rule with early stopping (patience 10) on the selection loss;
- ``last``: the last step.

    python examples/validation_overfitting.py --task logistic_cancer --steps 80
"""

from __future__ import annotations

import argparse
import json

import torch

from hyperdiff.app.config import OuterConfig
from hyperdiff.app.tasks import build_task, task_defaults
from hyperdiff.tuner.driver import HyperOptimizer, Stopping
from hyperdiff.tuner.outer_steps import DEFAULT_OFFLINE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="logistic_cancer")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--optimizer", help="outer optimizer (default: the task's, else "
                        f"{DEFAULT_OFFLINE})")
    parser.add_argument("--lr", type=float, help="outer lr (default: the task's, else "
                        f"{OuterConfig().lr})")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--json", help="write the per-step numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    task = build_task(args.task)
    defaults = task_defaults(args.task)
    opt = HyperOptimizer(
        list(task.problems),
        optimizer=args.optimizer or defaults.get("outer.optimizer", DEFAULT_OFFLINE),
        lr=args.lr or defaults.get("outer.lr", OuterConfig().lr), schedule="constant",
        selection=task.selection,
        stopping=Stopping(max_steps=args.steps, patience=None),
    )
    rows, failed = [], []
    for _ in range(args.steps):
        raw = opt.raw
        record = opt.step()
        if record.status != "ok":  # the divergence guard restored the last good values
            failed.append(f"step {record.step}: {record.message}")
            continue
        test = task.evaluate(raw, seeds=(0,))["test"]
        rows.append({"step": record.step, "val": record.val_loss,
                     "selection": record.selection_loss, "test": test["loss"],
                     "test_accuracy": test.get("accuracy")})

    def pick(key: str, upto: int) -> dict:
        return min(rows[:upto], key=lambda r: r[key])

    stop = len(rows)
    best, since = float("inf"), 0
    for i, r in enumerate(rows):
        best, since = (r["selection"], 0) if r["selection"] < best else (best, since + 1)
        if since >= args.patience:
            stop = i + 1
            break
    stopped_at = rows[stop - 1]["step"] + 1
    choices = {"initial": rows[0], "best val": pick("val", len(rows)),
               "best selection": pick("selection", len(rows)),
               f"early stop (at step {stopped_at})": pick("selection", stop), "last": rows[-1]}
    print(f"{args.task}: {args.steps} outer steps, constant lr, test loss of each rule")
    for line in failed:
        print(f"failed {line}")
    print(f"{'rule':<28}{'step':>5}{'val':>9}{'selection':>11}{'test':>9}{'test acc':>10}")
    for name, r in choices.items():
        acc = "" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
        print(f"{name:<28}{r['step']:>5}{r['val']:>9.4f}{r['selection']:>11.4f}"
              f"{r['test']:>9.4f}{acc:>10}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"task": args.task, "rows": rows, "failed": failed}, handle, indent=1)


if __name__ == "__main__":
    main()
