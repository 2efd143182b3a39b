"""Few-shot glyph classification: MAML, first-order MAML and Meta-SGD against the baselines.

The built-in ``glyphs_maml`` task (``hyperdiff.app.tasks.glyphs_maml``: 5-way episodes of
procedural glyph classes, 15 query images per class, a 784-64-5 ReLU MLP adapted by 5 SGD
steps at lr 0.5), 1-shot and 5-shot, each run built by the runner's meta plan
(``hyperdiff.app.plans.build_meta``, ``outer.mode = "meta"``: what ``hyperdiff run --task
glyphs_maml`` builds) and run by ``HyperOptimizer.run()``:

- ``MAML``: ``method.name = "reverse"`` (exact meta-gradient);
- ``first-order MAML``: ``method.name = "fomaml"``;
- ``Meta-SGD``: ``task.params.meta_sgd = true`` (a learning rate per parameter tensor, tuned
  beside theta_0), reverse;

against the two baselines of the run's report (:mod:`hyperdiff.app.meta_report`): the
random initialization and theta_0 pre-trained (Adam at the outer rate, one step per outer
step, on the pooled support and query sets of the episodes meta-training drew), each adapted
by the same 5 SGD steps. Seed ``s`` sets both ``task.data_seed`` (the glyph pool and the random
theta_0) and ``outer.seed`` (which episodes meta-training draws). Every value is scored on the
same ``--test-tasks`` held-out episodes of the 400 meta-test classes (the report's held-out
tasks): query accuracy and loss after adaptation, per seed the mean over the episodes with its
standard error, over seeds the mean and the standard deviation of the per-seed means.

Costs: drawing a glyph episode takes far longer than a meta-step of this small model, so the
episodes of a (shots, seed) are drawn once, timed on their own, and shared by every variant;
"meta-step" times are the outer loop's work alone (wall and CPU time of ``run()`` over its
steps). Timings are on a shared machine and noisy.

    OMP_NUM_THREADS=1 python benchmarks/meta_fewshot.py            # the table of docs/meta.md
    OMP_NUM_THREADS=1 python benchmarks/meta_fewshot.py --quick    # a few steps, for development

Writes benchmarks/results/meta_fewshot.json (``--quick``: meta_fewshot_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.meta_report import held_out_report, pretrained_start
from hyperdiff.app.plans import build_meta
from hyperdiff.engine.task_distribution import TaskDistribution, task_distribution
from hyperdiff.seeds import meta_task
from hyperdiff.tuner.distributed.spread import LocalSpreader

VARIANTS = {
    "MAML": ["method.name=reverse"],
    "first-order MAML": ["method.name=fomaml"],
    "Meta-SGD": ["method.name=reverse", "task.params.meta_sgd=true"],
}
BASELINES = {"random init": "initial", "pre-trained": "pretrained"}


def cached(tasks: TaskDistribution) -> TaskDistribution:
    """``tasks`` with its samplers memoized: every variant of a (shots, seed) adapts on the
    same episodes, drawn once (an episode is a pure function of its arguments)."""
    held_out = None if tasks.held_out is None else lru_cache(maxsize=None)(tasks.held_out)
    return task_distribution(lru_cache(maxsize=None)(tasks.sample), name=tasks.name,
                             held_out=held_out)


def configure(shots: int, seed: int, variant: list[str], args: argparse.Namespace) -> Any:
    return load_config(overrides=[
        "task.name=glyphs_maml", f"task.params.shots={shots}", f"task.data_seed={seed}",
        f"outer.seed={seed}", f"outer.meta_batch={args.batch}", f"stop.max_steps={args.steps}",
        f"outer.lr={args.lr}", f"outer.meta_test_tasks={args.test_tasks}", *variant])


def scored(report: dict[str, float]) -> dict[str, float]:
    """One seed's held-out accuracy and loss with their standard errors over the episodes."""
    root = math.sqrt(report["tasks"])
    return {"accuracy": report["query_accuracy"],
            "accuracy_se": report["query_accuracy_std"] / root,
            "loss": report["query_loss"], "loss_se": report["query_loss_std"] / root}


def one_seed(shots: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant and both baselines at one (shots, seed), on shared episodes."""
    tasks: TaskDistribution | None = None
    out: dict[str, Any] = {}
    for name, variant in VARIANTS.items():
        config = configure(shots, seed, variant, args)
        task, loop = build_meta(config)
        if tasks is None:  # draw the run's and the held-out episodes once, timed
            tasks = cached(task.tasks)
            start = time.perf_counter()
            for step in range(args.steps):
                for i in range(args.batch):
                    tasks.sample(*meta_task(seed, step, args.batch, i))
            out["draw_train_s"] = time.perf_counter() - start
            start = time.perf_counter()
            held = replace(task, tasks=tasks)
            held_out_report(held, {"initial": task.hparams.raw}, args.test_tasks,
                            LocalSpreader())
            out["draw_and_score_held_out_s"] = time.perf_counter() - start
        task = replace(task, tasks=tasks)
        loop.plan.tasks = tasks
        start, start_cpu = time.perf_counter(), time.process_time()
        result = loop.run()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        values = {"tuned": result.final_raw}
        if name == "MAML":  # the baselines: theta_0's start, the same for every variant
            values["initial"] = task.hparams.raw
            start, start_cpu = time.perf_counter(), time.process_time()
            pre = pretrained_start(task, task.hparams.raw, steps=args.steps, batch=args.batch,
                                   seed=seed, lr=args.lr)
            assert pre is not None  # glyphs_maml tunes theta_0
            values["pretrained"] = pre
            out["pre-trained"] = {"wall_s": time.perf_counter() - start,
                                  "cpu_s": time.process_time() - start_cpu}
        report = held_out_report(task, values, args.test_tasks, LocalSpreader())
        out[name] = {**scored(report["tuned"]), "wall_s": wall, "cpu_s": cpu,
                     "step_wall_s": wall / args.steps, "step_cpu_s": cpu / args.steps,
                     "steps": len(result.history)}
        if name == "MAML":
            out["random init"] = {**scored(report["initial"]), "wall_s": 0.0, "cpu_s": 0.0}
            out["pre-trained"] |= scored(report["pretrained"])
        print(f"  {shots}-shot seed {seed} {name}: acc {out[name]['accuracy']:.3f}, "
              f"{wall:.1f} s", flush=True)
    return out


def summary(per_seed: list[dict[str, Any]], row: str) -> dict[str, float]:
    """Mean and std over seeds of a row's per-seed values."""
    def column(key: str) -> torch.Tensor:
        return torch.tensor([s[row][key] for s in per_seed], dtype=torch.float64)

    def std(key: str) -> float:
        return float(column(key).std()) if len(per_seed) > 1 else 0.0

    out = {"accuracy": float(column("accuracy").mean()), "accuracy_std": std("accuracy"),
           "accuracy_se": float(column("accuracy_se").mean()),
           "loss": float(column("loss").mean()), "loss_std": std("loss"),
           "wall_s": float(column("wall_s").mean()), "cpu_s": float(column("cpu_s").mean())}
    if "step_wall_s" in per_seed[0][row]:
        out |= {"step_wall_s": float(column("step_wall_s").min()),
                "step_cpu_s": float(column("step_cpu_s").min())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="outer steps per run")
    parser.add_argument("--batch", type=int, default=4, help="episodes per outer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="outer (Adam) learning rate")
    parser.add_argument("--test-tasks", type=int, default=200,
                        help="held-out episodes per seed")
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, 3 outer steps, 10 held-out episodes")
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", default=None,
                        help="only print the table of this result file")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(Path(args.table).read_text()))
        return
    if args.quick:
        args.seeds, args.steps, args.test_tasks = 2, 3, 10
    out = Path(args.out or "benchmarks/results/"
               f"meta_fewshot{'_quick' if args.quick else ''}.json")
    torch.set_num_threads(1)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for shots in args.shots:
        per_seed = [one_seed(shots, seed, args) for seed in range(args.seeds)]
        rows = {row: summary(per_seed, row) for row in [*BASELINES, *VARIANTS]}
        results[str(shots)] = {"rows": rows, "per_seed": per_seed}
    total = time.perf_counter() - started
    data = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "table")},
            "total_s": total, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print_table(data)


def print_table(data: dict[str, Any]) -> None:
    """The table of a result file: accuracy and loss per row, the cost of each variant (CPU
    per meta-step against MAML's, the best over seeds; wall time of the whole run, mean over
    seeds), and the time spent drawing the episodes."""
    args = data["args"]
    print(f"glyphs_maml 5-way, {args['seeds']} seeds x {args['steps']} outer steps of "
          f"{args['batch']} episodes (Adam {args['lr']:g}), held-out accuracy on "
          f"{args['test_tasks']} meta-test episodes per seed (mean +- std over seeds; se: mean "
          "standard error within a seed); CPU, 1 thread, shared machine: times are noisy")
    print(f"{'shots':>5} {'variant':<18}{'accuracy':>17}{'se':>7}{'loss':>8}"
          f"{'CPU ms/step':>13}{'x MAML':>8}{'wall ms/step':>14}{'run s':>7}")
    for shots, block in data["results"].items():
        maml = block["rows"]["MAML"]["step_cpu_s"]
        for row, r in block["rows"].items():
            cpu, step = r.get("step_cpu_s"), r.get("step_wall_s")
            print(f"{shots:>5} {row:<18}{r['accuracy']:>9.3f} +- {r['accuracy_std']:.3f}"
                  f"{r['accuracy_se']:>7.3f}{r['loss']:>8.3f}"
                  f"{'' if cpu is None else f'{1e3 * cpu:.0f}':>13}"
                  f"{'' if cpu is None else f'{cpu / maml:.2f}':>8}"
                  f"{'' if step is None else f'{1e3 * step:.0f}':>14}{r['wall_s']:>7.1f}")
        draws = [s["draw_train_s"] for s in block["per_seed"]]
        held = [s["draw_and_score_held_out_s"] for s in block["per_seed"]]
        print(f"{shots:>5} drawing the {args['steps'] * args['batch']} training episodes: "
              f"{min(draws):.0f}-{max(draws):.0f} s per seed; the {args['test_tasks']} "
              f"held-out episodes (drawn and scored once): {min(held):.0f}-{max(held):.0f} s")
    print(f"total {data['total_s']:.0f} s")


if __name__ == "__main__":
    main()
