"""A prototype, not an option: confirm only a chaotic would-be best step.

``stop.chaos_ratio`` (docs/driver.md, "Chaotic steps") ranks a step whose hypergradient norm
is above 30x its loss below every calm step. That helps at the suite's lengths and hurts at 3x
them, where the hypergradient is chaotic in trainings that are not. This prototype asks the
training itself instead. A step that would be the new best by its selection loss and whose
hypergradient is chaotic is trained ``--confirm`` more times on other minibatch seeds, through
``outer.confirm``'s mechanism (``OfflinePlan._beats_best`` swapped for the run). It is then
ranked by the mean. Every other step is ranked as today, and the outer steps are unchanged.

Per row: the default offline run of a task reference (``--steps``: ``inner.steps``, 0 the
task's own; ``--seed``: ``outer.seed``), once as today and once with the prototype, both picks
retrained on the report seeds, and their test-loss ratio.

    OMP_NUM_THREADS=1 python benchmarks/confirm_chaotic.py \\
        benchmarks/suite_tasks/shapes_cnn.py:build_lr_x0p1 --report-seeds 10 --out row.json

``benchmarks/results/confirm_chaotic_s35.json`` holds the 8 rows of session 35: the six runs at
the suite's lengths in which a chaotic step was ever the best, and ``char_lm`` at 300 steps,
outer seeds 0 and 1, on 5 report seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import hyperdiff.tuner.offline_plan as offline_plan
from hyperdiff.app.config import load_config
from hyperdiff.app.plans import build
from hyperdiff.seeds import report_seeds
from hyperdiff.tuner.stopping import CHAOS_RATIO, calm, ranking_loss

ORIGINAL = offline_plan.OfflinePlan._beats_best


def chaotic_would_be_best(self: Any, loop: Any, step: int, value: float, outcome: Any) -> bool:
    """Confirm a step ranked by its selection loss whose loss is below the best's and whose
    hypergradient norm is above ``CHAOS_RATIO x max(|L_val|, 1)``."""
    if ranking_loss(step, loop.tie_steps, True) != "selection":
        return False
    fields = outcome.fields
    if calm(fields.get("grad_norm"), fields["val_loss"], CHAOS_RATIO):
        return False
    return bool(loop.ranks_above_best("selection", value, fields["val_loss"],
                                      fields.get("grad_norm"))[1])


def run(ref: str, steps: int, seed: int, confirm: int) -> tuple[Any, Any, float, int]:
    """The default offline run (``confirm`` > 0: with the prototype); task, result, wall
    seconds, trainings."""
    overrides = [f"task.name={ref}", "outer.mode=offline", f"outer.seed={seed}",
                 *([f"inner.steps={steps}"] if steps else [])]
    task, loop = build(load_config(overrides=overrides))
    if confirm:
        loop.plan.confirm = confirm
        offline_plan.OfflinePlan._beats_best = chaotic_would_be_best  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        result = loop.run()
        seconds = time.perf_counter() - started
    finally:
        offline_plan.OfflinePlan._beats_best = ORIGINAL  # type: ignore[method-assign]
    return task, result, seconds, loop.plan.sampler.trainings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="task reference, e.g. benchmarks/suite_tasks/char_lm.py:build")
    parser.add_argument("--steps", type=int, default=0, help="inner.steps (0: the task's own)")
    parser.add_argument("--seed", type=int, default=0, help="outer.seed")
    parser.add_argument("--confirm", type=int, default=2, help="trainings per confirmation")
    parser.add_argument("--report-seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    for name, confirm in (("today", 0), ("prototype", args.confirm)):
        task, result, seconds, trainings = run(args.ref, args.steps, args.seed, confirm)
        test = task.evaluate_all([result.best_raw], seeds=report_seeds(args.report_seeds))
        rows[name] = {"best_step": result.best_step, "best_loss": result.best_loss,
                      "test": test[0]["test"]["loss"], "time_s": seconds,
                      "trainings": trainings, "steps": len(result.history)}
        print(args.ref, name, rows[name], flush=True)
    rows["ratio"] = rows["prototype"]["test"] / rows["today"]["test"]
    args.out.write_text(json.dumps({"ref": args.ref, "steps": args.steps, "seed": args.seed,
                                    "confirm": args.confirm,
                                    "report_seeds": args.report_seeds, **rows}, indent=1) + "\n")
    print(f"test loss, prototype / today: {rows['ratio']:.4f}")


if __name__ == "__main__":
    main()
