"""Offline ``curvature`` against reverse mode: test loss and one outer step's cost (issue 20).

Every run is ``run_experiment`` offline with the default config (``stop.max_steps = 30``)
except the ``--configs`` overrides (default ``method.name=reverse`` and
``method.name=curvature``) and ``outer.seed``, on the suite's tasks
(``benchmarks/suite_tasks/``) from the task's own start and its learning rate x0.1 and x10.
Score: the held-out test loss of the report's retraining (mean over its 3 seeds) at the run's
best values. Cost, per task in the same process, best of ``--repeats`` interleaved rounds (a
warm-up round first): one plain training at the start's values (``trained_params``), each
configuration's hypergradient call alone and one loop step (``HyperOptimizer.step()`` after
the first, without the global phase: training, hypergradient, selection evaluation, record),
as ratios over the plain training. Timings on a shared machine are noisy: compare ratios of one
task's block only.

    OMP_NUM_THREADS=1 python benchmarks/offline_curvature.py --tasks tabular_mlp gru_seq \
        --out /tmp/a.json
    python benchmarks/offline_curvature.py --merge /tmp/a.json /tmp/b.json \
        --out benchmarks/results/offline_curvature.json
    python benchmarks/offline_curvature.py --table benchmarks/results/offline_curvature.json
    OMP_NUM_THREADS=1 python benchmarks/offline_curvature.py --agreement --out /tmp/c.json

``--agreement`` instead compares each configuration's hypergradient at the task's start (one
training of its first problem) with the first configuration's: cosine and signs. Any method's
configuration serves, e.g. truncation and its carried head (docs/long_horizon.md):

    OMP_NUM_THREADS=1 python benchmarks/offline_curvature.py --no-cost --tasks gru_seq \
        --configs method.name=reverse "method.name=truncated method.fraction=0.25 \
        method.head=curvature" --out /tmp/h.json
    OMP_NUM_THREADS=1 python benchmarks/offline_curvature.py --cost-only --configs \
        method.name=reverse "method.name=truncated method.fraction=0.25" --out /tmp/c.json

Writes ``--out`` after every run (``cost``: one block per task; ``runs``: one entry per
configuration x task x start x seed; ``agreement``: one block per task).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from outer_defaults import RESULTS, TASK_DIR, run_one
from outer_starts import _finite, _num
from outer_step_cost import best_of

from hyperdiff.app.config import load_config
from hyperdiff.app.plans import build
from hyperdiff.app.tasks.base import trained_params

CONFIGS = ("method.name=reverse", "method.name=curvature")
TASKS = ("char_lm", "shapes_cnn", "tabular_mlp", "gru_seq")
STARTS = (1.0, 10.0, 0.1)
FIXED = {"outer.mode": "offline", "stop.max_steps": 30}


def overrides(config: str) -> dict[str, str]:
    """``"a.b=1 c.d=x"`` -> ``{"a.b": "1", "c.d": "x"}``."""
    return dict(item.split("=", 1) for item in config.split())


def cost(file: str, configs: Sequence[str], repeats: int) -> dict[str, Any]:
    """One task's plain training, and per configuration its hypergradient call and a loop
    step, best of ``repeats`` interleaved rounds; ratios over the plain training."""
    loops = {}
    for config in configs:
        # no global phase: its points (after a weak start) are plain trainings, not steps
        settings = {**FIXED, "stop.max_steps": repeats + 3, "stop.patience": 0,
                    "outer.explore": 0, **overrides(config),
                    "task.name": f"{TASK_DIR / file}.py:build"}
        _, loop = build(load_config(overrides=[f"{k}={v}" for k, v in settings.items()]))
        loop.step()  # the first step also measures the guard's untrained reference
        loops[config] = loop
    problem, raw = next(iter(loops.values())).problems[0], next(iter(loops.values())).raw
    kinds: dict[str, Any] = {"plain": lambda i: trained_params(problem, raw, seed=i)}
    for config, loop in loops.items():
        kinds[f"{config} hypergradient"] = (
            lambda i, loop=loop: loop.method(replace(loop.problems[0], seed=i), loop.raw))
        kinds[f"{config} loop step"] = lambda _i, loop=loop: loop.step()
    best = best_of(kinds, repeats)
    return {"task": file, "steps": problem.steps, "hparams": problem.hparams.numel,
            "trainings_per_step": {c: loop.history[-1].samples * len(loop.problems)
                                   for c, loop in loops.items()},
            "seconds": best, "ratios": {k: v / best["plain"] for k, v in best.items()}}


def agreement(file: str, configs: Sequence[str]) -> dict[str, Any]:
    """Each configuration's hypergradient at the task's start (its first problem, one
    training) against the first configuration's: cosine and per-value sign agreement."""
    vectors = {}
    for config in configs:
        settings = {**FIXED, **overrides(config), "task.name": f"{TASK_DIR / file}.py:build"}
        _, loop = build(load_config(overrides=[f"{k}={v}" for k, v in settings.items()]))
        vectors[config] = loop.method(loop.problems[0], loop.raw).vector.double()
    first = vectors[configs[0]]
    return {"task": file, "names": list(loop.raw), "vectors": {c: v.tolist()
                                                               for c, v in vectors.items()},
            "cosine": {c: float(v @ first / (v.norm() * first.norm()))
                       for c, v in vectors.items()},
            "same_sign": {c: (v.sign() == first.sign()).tolist() for c, v in vectors.items()}}


def table(data: dict[str, Any]) -> str:
    """Cost ratios per task, then test loss per task x start: each configuration's seeds and
    mean, and the ratio of means to the first configuration."""
    configs = data["configs"]
    out = ["one outer step over one plain training (best of repeats, same process)",
           "task | plain s | " + " | ".join(f"{c} hypergrad | {c} loop step" for c in configs)]
    for block in data["cost"]:
        ratios = block["ratios"]
        out.append(" | ".join([block["task"], f"{block['seconds']['plain']:.3f}",
                               *(f"{ratios[f'{c} {kind}']:.2f}x" for c in configs
                                 for kind in ("hypergradient", "loop step"))]))
    if data.get("agreement"):
        out += ["", f"hypergradient at the start against {configs[0]}'s: cosine, same signs"]
        out += [f"{block['task']} ({', '.join(block['names'])}): " + "; ".join(
            f"{c} {block['cosine'][c]:+.2f}, {sum(block['same_sign'][c])}/{len(block['names'])}"
            for c in configs[1:]) for block in data["agreement"]]
    out += ["", "test loss (report retraining, mean of 3 seeds) per outer.seed",
            "task | start | " + " | ".join(f"{c} (seeds) | mean" for c in configs)
            + " | ratio to first (seeds both ran)"]
    runs = data["runs"]
    for task, start in dict.fromkeys((r["task"], r["start"]) for r in runs):
        cells, means = [], []
        for config in configs:
            mine = sorted((r for r in runs if (r["task"], r["start"], r["config"])
                           == (task, start, config)), key=lambda r: r["seed"])
            losses = [r["test_loss"] for r in mine if _finite(r["test_loss"])]
            means.append(statistics.mean(losses) if losses else math.nan)
            cells += [" / ".join(_num(r["test_loss"]) for r in mine), _num(means[-1])]
        row = [r for r in runs if (r["task"], r["start"]) == (task, start)]
        ratios = " / ".join(_num(matched_ratio(row, c, configs[0]), ".3f") for c in configs[1:])
        out.append(" | ".join([task, f"x{start:g}", *cells, ratios]))
    out += [f"{c} / {configs[0]}: geometric mean {_num(g, '.3f')} over {n} rows"
            for c, (g, n) in geometric_means(runs, configs).items()]
    return "\n".join(out)


def matched_ratio(row: Sequence[dict[str, Any]], config: str, first: str) -> float:
    """One task x start's mean test loss of ``config`` over ``first``'s, over the seeds both
    ran (NaN where none)."""
    loss = {(r["config"], r["seed"]): r["test_loss"] for r in row if _finite(r["test_loss"])}
    seeds = [s for c, s in loss if c == config and (first, s) in loss]
    if not seeds:
        return math.nan
    return (statistics.mean(loss[(config, s)] for s in seeds)
            / statistics.mean(loss[(first, s)] for s in seeds))


def geometric_means(runs: Sequence[dict[str, Any]], configs: Sequence[str]
                    ) -> dict[str, tuple[float, int]]:
    """Per configuration after the first: the geometric mean of :func:`matched_ratio` over
    the task x start rows, and the rows."""
    out = {}
    for config in configs[1:]:
        ratios = [matched_ratio([r for r in runs if (r["task"], r["start"]) == key], config,
                                configs[0])
                  for key in dict.fromkeys((r["task"], r["start"]) for r in runs)]
        logs = [math.log(x) for x in ratios if _finite(x)]
        out[config] = (math.exp(sum(logs) / len(logs)) if logs else math.nan, len(logs))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--starts", nargs="+", type=float, default=list(STARTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--repeats", type=int, default=3, help="cost: best of this many")
    parser.add_argument("--no-cost", action="store_true", help="runs only")
    parser.add_argument("--cost-only", action="store_true", help="the cost blocks only")
    parser.add_argument("--agreement", action="store_true",
                        help="only the hypergradients at the start against the first config's")
    parser.add_argument("--out", type=Path, default=RESULTS / "offline_curvature.json")
    parser.add_argument("--table", type=Path, help="print the table of a results file")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="combine the blocks and runs of these results files into --out")
    args = parser.parse_args(argv)
    if args.merge:
        loaded = [json.loads(path.read_text()) for path in args.merge]
        merged = {**loaded[0], **{key: [x for d in loaded for x in d.get(key, [])]
                                  for key in ("cost", "runs", "agreement")}}
        args.out.write_text(json.dumps(merged, indent=1, default=str))
        args.table = args.out
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    data: dict[str, Any] = {"settings": FIXED, "configs": args.configs,
                            "score": "held-out test loss, report retraining (3 seeds)",
                            "cost": [], "runs": [], "agreement": []}
    began = time.perf_counter()
    if args.agreement:
        data["agreement"] = [agreement(file, args.configs) for file in args.tasks]
        args.out.write_text(json.dumps(data, indent=1, default=str))
        print(table(data))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for file in args.tasks:
            if not args.no_cost:
                data["cost"].append(cost(file, args.configs, args.repeats))
                print(f"[{time.perf_counter() - began:7.1f} s] {file} cost: "
                      + ", ".join(f"{k} {v:.2f}x" for k, v in data["cost"][-1]["ratios"].items()),
                      flush=True)
                args.out.write_text(json.dumps(data, indent=1, default=str))
            for start in [] if args.cost_only else args.starts:
                for seed in args.seeds:
                    for config in args.configs:
                        work = Path(tmp) / f"{file}-{start:g}-{seed}-{len(data['runs'])}"
                        found = run_one(file, start, {**overrides(config), "outer.seed": seed},
                                        work, FIXED)
                        data["runs"].append({"config": config, "task": file, "start": start,
                                             "seed": seed, **found})
                        print(f"[{time.perf_counter() - began:7.1f} s] {file} x{start:g} seed "
                              f"{seed} {config}: test loss {_num(found['test_loss'])} "
                              f"({found['time_s']:.0f} s, {found.get('stop_reason')})",
                              flush=True)
                        args.out.write_text(json.dumps(data, indent=1, default=str))
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
