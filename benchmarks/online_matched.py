"""Does the default online run end worse than not tuning? Compared on the same minibatch order.

An online run trains one run with ``outer.train_seed`` (default: its problem's seed; ``outer.seed``
seeds only its validation draws, which the default's full validation split does not make), while
the suite's untuned row and the learning-rate-free optimizers are means over the report seeds.
For each suite task and start this prints, on the validation split (what the windows descend)
and the held-out test split:

- ``own``: the online run's own final model (no retraining);
- ``untuned same order``: the start's values trained plainly with the online run's seed;
- ``untuned suite seeds``: the same, mean over ``suite.SEEDS`` (the suite's untuned row);
- ``final values same order`` / ``suite seeds``: the run's final values trained plainly (did the
  values or the trajectory lose?).

    OMP_NUM_THREADS=1 python benchmarks/online_matched.py --starts 0.1 10 \
        --out benchmarks/results/online_matched_s26.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suite_tasks"))

from online_cost import task_arguments  # noqa: E402
from online_defaults import timed_online  # noqa: E402
from suite import SEEDS, TASK_DIR, _load  # noqa: E402
from suite_common import start_name  # noqa: E402

import hyperdiff as hd  # noqa: E402
from hyperdiff.app.tasks.base import trained_params  # noqa: E402

SPLITS = ("val", "test")


def plain_losses(task: hd.Task, raw: Mapping[str, Tensor], seeds: tuple[int, ...]
                 ) -> dict[str, float]:
    """Validation and test loss of plain trainings at ``raw``, mean over ``seeds``."""
    total = dict.fromkeys(SPLITS, 0.0)
    for seed in seeds:
        params, buffers, hview = trained_params(task.final_problem, raw, seed=seed)
        metrics = task.metrics_at(params, buffers, hview)
        for split in SPLITS:
            total[split] += metrics[split]["loss"] / len(seeds)
    return total


def matched_row(ref: str, config: str) -> dict[str, Any]:
    """One online run with the overrides ``config`` and its plain-training references."""
    try:
        task, loop, result, _, _ = timed_online(ref, config)
    except (hd.HyperdiffError, hd.NonFiniteError) as err:
        return {"config": config, "note": f"failed: {err}"}
    seed = loop.plan.problem.seed  # the one training's (outer.train_seed, else the problem's)
    final = {k: v.detach() for k, v in result.final_raw.items()}
    hview = task.hparams.view(task.final_problem.raw_tensors(result.final_raw))
    own = task.metrics_at(result.params, result.buffers, hview)
    return {"config": config, "online_seed": seed,
            "own": {split: own[split]["loss"] for split in SPLITS},
            "untuned_same_order": plain_losses(task, task.hparams.raw, (seed,)),
            "untuned_suite_seeds": plain_losses(task, task.hparams.raw, SEEDS),
            "final_same_order": plain_losses(task, final, (seed,)),
            "final_suite_seeds": plain_losses(task, final, SEEDS),
            "final_hparams": {k: float(v.float().mean()) for k, v in
                              result.final_hparams.natural().items()}}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: test loss (validation loss in brackets) per reference."""
    cols = ("own", "untuned_same_order", "untuned_suite_seeds", "final_same_order",
            "final_suite_seeds")
    lines = ["| task | start | config | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        head = f"| {r['task']} | {r['start']} | {r['config'] or 'default'} |"
        if "own" not in r:
            lines.append(head + f" {r['note'][:60]} |" + " |" * (len(cols) - 1))
            continue
        lines.append(head + "".join(f" {r[c]['test']:.4f} ({r[c]['val']:.4f}) |" for c in cols))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    task_arguments(parser)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "online_matched.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.tasks:
        has_lr = getattr(_load(TASK_DIR / f"{name}.py"), "LR_NAME", None) is not None
        for factor in [1.0, *(args.starts if has_lr else [])]:
            ref = f"{TASK_DIR / name}.py:{'build' if factor == 1.0 else start_name(factor)}"
            for config in args.configs:
                rows.append({"task": name, "start": f"x{factor:g}", **matched_row(ref, config)})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"configs": args.configs, "seeds": list(SEEDS),
                                    "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
