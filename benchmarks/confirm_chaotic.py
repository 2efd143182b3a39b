"""Confirming a chaotic would-be best step (``outer.confirm_chaotic``), on and off.

``stop.chaos_ratio`` (docs/driver.md, "Chaotic steps") ranks a step whose hypergradient norm
is above 30x its loss below every calm step. That helps at the suite's lengths and hurts at 3x
them, where the hypergradient is chaotic in trainings that are not. ``outer.confirm_chaotic``
(2 by default since session 36) asks the training itself instead: a step that would be the new
best by its selection loss and whose hypergradient is chaotic is trained twice more on other
minibatch seeds and ranked by the mean (:mod:`hyperdiff.tuner.confirm`). Every other step is
ranked as before, and the outer steps are unchanged.

Per row: the default offline run of a task reference (``--steps``: ``inner.steps``, 0 the
task's own; ``--seed``: ``outer.seed``), once with ``outer.confirm_chaotic = 0`` and once with
the default, both picks retrained on the report seeds, and their test-loss ratio.

    OMP_NUM_THREADS=1 python benchmarks/confirm_chaotic.py \\
        benchmarks/suite_tasks/shapes_cnn.py:build_lr_x0p1 --report-seeds 10 --out row.json

``benchmarks/results/confirm_chaotic_s35.json`` holds the rows of session 35, measured with a
prototype of the same rule (``OfflinePlan._beats_best`` swapped for the run; its keys
``today`` and ``prototype`` are ``off`` and ``on`` here): the six runs at the suite's lengths
in which a chaotic step was ever the best, ``char_lm`` at 300 steps, outer seeds 0 and 1, and
``gru_seq`` at 1000 steps, on 5 report seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from hyperdiff.app.config import load_config
from hyperdiff.app.plans import build
from hyperdiff.seeds import report_seeds


def overrides(ref: str, steps: int, seed: int, confirm_chaotic: int) -> list[str]:
    """The config of a row's run: the defaults but for these keys."""
    return [f"task.name={ref}", "outer.mode=offline", f"outer.seed={seed}",
            f"outer.confirm_chaotic={confirm_chaotic}",
            *([f"inner.steps={steps}"] if steps else [])]


def run(ref: str, steps: int, seed: int, confirm_chaotic: int) -> tuple[Any, Any, float, int]:
    """The default offline run at ``outer.confirm_chaotic``; task, result, wall seconds,
    trainings."""
    task, loop = build(load_config(overrides=overrides(ref, steps, seed, confirm_chaotic)))
    started = time.perf_counter()
    result = loop.run()
    return task, result, time.perf_counter() - started, loop.plan.sampler.trainings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="task reference, e.g. benchmarks/suite_tasks/char_lm.py:build")
    parser.add_argument("--steps", type=int, default=0, help="inner.steps (0: the task's own)")
    parser.add_argument("--seed", type=int, default=0, help="outer.seed")
    parser.add_argument("--confirm", type=int, default=2, help="outer.confirm_chaotic when on")
    parser.add_argument("--report-seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    for name, count in (("off", 0), ("on", args.confirm)):
        task, result, seconds, trainings = run(args.ref, args.steps, args.seed, count)
        test = task.evaluate_all([result.best_raw], seeds=report_seeds(args.report_seeds))
        rows[name] = {"best_step": result.best_step, "best_loss": result.best_loss,
                      "test": test[0]["test"]["loss"], "time_s": seconds,
                      "trainings": trainings, "steps": len(result.history)}
        print(args.ref, name, rows[name], flush=True)
    rows["ratio"] = rows["on"]["test"] / rows["off"]["test"]
    args.out.write_text(json.dumps({"ref": args.ref, "steps": args.steps, "seed": args.seed,
                                    "confirm": args.confirm,
                                    "report_seeds": args.report_seeds, **rows}, indent=1) + "\n")
    print(f"test loss, on / off: {rows['ratio']:.4f}")


if __name__ == "__main__":
    main()
