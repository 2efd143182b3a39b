"""Hyperdiff against black-box search: random search, Optuna's TPE and a scalar grid.

Tasks: ``logistic_digits`` (multinomial logistic regression on digits, 64 per-feature L2
penalties; random search and TPE search all 64 in log space) and ``mlp_digits`` (the MLP
training recipe; black-box methods search one shared value per hyperparameter). Every
black-box trial is one inner training; it minimises the validation loss the hypergradient sees.
A hyperdiff outer step costs ``samples x folds`` trainings (each with its backward pass).

Hyperdiff runs these ways:

- ``hd plain``: hold-out validation, constant outer learning rate, no tied steps, no
  selection split, no early stopping; returns the step with the lowest validation loss.
- ``hd defaults``: the task's recommended settings with the driver's defaults, i.e.
  ``hyperdiff run --task NAME`` (on logistic_digits: 5-fold CV, 8 tied steps, selection split,
  early stopping, cosine decay); a CV run's losses are CV losses, so it is not drawn.
- ``hd holdout`` (tasks whose defaults cross-validate): the defaults with ``task.cv_folds=0``.
- ``grid+hd``: the scalar grid first, then the hold-out defaults without tied steps started
  at the grid's winner (the grid's trainings and time count in its curve).

``grid lam cv5`` (logistic_digits) scores the scalar grid by the same CV loss as the defaults,
to tell what cross-validation alone buys.

Every winner is retrained on 3 fresh seeds and evaluated on the held-out test split.

    OMP_NUM_THREADS=1 python benchmarks/blackbox.py          # full run (a few minutes)
    OMP_NUM_THREADS=1 python benchmarks/blackbox.py --quick  # smoke run

Writes benchmarks/results/blackbox.json and benchmarks/results/blackbox.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
from sklearn.model_selection import ParameterGrid

from hyperdiff.app.cli.compare import evaluate_values
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import build
from hyperdiff.app.search import (
    OPTUNA_MISSING,
    SearchResult,
    from_history,
    optuna_available,
    random_search,
    run_points,
    tpe_search,
)
from hyperdiff.seeds import REPORT_SEED
from hyperdiff.tuner.driver import HyperOptimizer, Stopping

RESULTS = Path(__file__).parent / "results"
SEEDS = tuple(REPORT_SEED + i for i in range(3))
GRIDS = {
    "logistic_digits": {"grid lam": {"lam": np.logspace(-5, 0, 25).tolist()}},
    "mlp_digits": {"grid wd": {"weight_decay": np.logspace(-6, -1, 25).tolist()},
                   "grid lr": {"lr": np.logspace(-3, 0, 25).tolist()}},
}
PER_COORDINATE = {"logistic_digits": ["lam"], "mlp_digits": []}
CV_GRID = {"logistic_digits"}
"""Tasks whose defaults cross-validate: the scalar grid is also scored by the same CV loss."""
REFINE = {"logistic_digits": "grid lam", "mlp_digits": "grid lr"}
"""The grid whose winner ``grid+hd`` starts hyperdiff (with its defaults) from."""


HOLDOUT = ["task.cv_folds=0", "outer.tie_steps=0"]
"""Overrides that turn a task's defaults into plain hold-out validation (for ``hd plain`` and
``grid+hd``, whose curves are compared with the black-box searches' validation losses)."""


def hyperdiff_runs(name: str, quick: bool) -> list[tuple[str, SearchResult, dict, str, bool]]:
    """(label, curve, raw winner, picked by, curve comparable) of the hyperdiff variants."""
    overrides = [f"task.name={name}"] + (["stop.max_steps=4"] if quick else [])
    config = load_config(overrides=overrides)
    out = []
    task, _ = build(load_config(overrides=overrides + HOLDOUT))
    plain = HyperOptimizer(
        list(task.problems), lr=config.outer.lr, samples=config.outer.samples,
        schedule="constant", selection=None,
        stopping=Stopping(max_steps=config.stop.max_steps, patience=None),
    )
    result = plain.run()
    out.append(("hd plain", from_history(result.history, method="hd plain"), result.best_raw,
                result.criterion, True))
    variants = [("hd defaults", config)]
    if config.task.cv_folds:  # the defaults without cross-validation: a comparable curve
        variants.append(("hd holdout", load_config(overrides=[*overrides, "task.cv_folds=0"])))
    for label, cfg in variants:
        _, driver = build(cfg)
        result = driver.run()
        out.append((label, from_history(result.history, method=label), result.best_raw,
                    result.criterion, cfg.task.cv_folds == 0))
    return out


def cv_grid(name: str, values: list[dict], folds: int) -> tuple[SearchResult, dict]:
    """The scalar grid scored by the mean validation loss over ``folds`` CV folds (one
    training per fold and point), as ``hd defaults`` scores its tied steps. Returns the curve
    (CV losses: not comparable with hold-out ones) and the winner's report, retrained on the
    whole pool like every CV winner."""
    task, _ = build(load_config(overrides=[f"task.name={name}", f"task.cv_folds={folds}"]))
    result = run_points(task, values, method=f"grid lam cv{folds}", objective="outer_loss")
    return result, evaluate_values(task, result.best.values, SEEDS)


def refine(name: str, quick: bool, grid: SearchResult) -> tuple[SearchResult, dict, str]:
    """``grid+hd``: the driver's defaults started at the grid's winner; the curve continues
    the grid's (its trainings and wall time count)."""
    config = load_config(overrides=[f"task.name={name}", *HOLDOUT] + (["stop.max_steps=4"]
                                                                      if quick else []))
    task, defaults = build(config)
    start = {n: torch.tensor(v, dtype=torch.float64) for n, v in grid.best.values.items()}
    problems = [replace(p, hparams=p.hparams.with_natural(**start)) for p in task.problems]
    driver = HyperOptimizer(
        problems, method=defaults.method, lr=config.outer.lr, schedule=config.outer.schedule,
        samples=config.outer.samples, selection=task.selection, stopping=defaults.stopping,
    )
    result = driver.run()
    steps = from_history(result.history).trials
    shifted = [replace(t, number=len(grid.trials) + t.number,
                       trainings=grid.trainings + t.trainings, time_s=grid.time_s + t.time_s)
               for t in steps]
    return (SearchResult("grid+hd", grid.trials + tuple(shifted)), result.best_raw,
            "grid val, then selection")


def row(result: SearchResult, metrics: dict, picked_by: str, comparable: bool = True) -> dict:
    best = result.best
    test = metrics["test"]
    return {
        "method": result.method, "trainings": result.trainings, "time_s": result.time_s,
        "best_val_loss": best.objective if comparable else None,
        "time_to_best_s": best.time_s, "picked_by": picked_by,
        "winner_val_loss": metrics["val"]["loss"],
        "winner_selection_loss": metrics.get("selection", {}).get("loss"),
        "test_loss": test["loss"], "test_accuracy": test.get("accuracy"),
        "curve": result.curve() if comparable else None,
    }


def run_task(name: str, trials: int, quick: bool) -> dict:
    """Every method on task ``name``; returns its JSON block."""
    config = load_config(overrides=[f"task.name={name}"])
    task, _ = build(config)  # the task's defaults: with CV, winners train on train + val
    holdout, _ = build(load_config(overrides=[f"task.name={name}", *HOLDOUT]))
    rows = []
    for label, curve, raw, picked, comparable in hyperdiff_runs(name, quick):
        print(f"  {label}: {curve.trainings} trainings, {curve.time_s:.1f} s", flush=True)
        where = holdout if comparable else task
        rows.append(row(curve, where.evaluate(raw, seeds=SEEDS), picked, comparable))
    task = holdout  # black-box searches: hold-out validation, winners trained on train
    per = PER_COORDINATE[name]
    searches = [("random", random_search)]
    if optuna_available():
        searches.append(("tpe", tpe_search))
    else:
        print(f"  {OPTUNA_MISSING}")
    for label, search in searches:
        result = search(task, trials, seed=0, per_coordinate=per)
        print(f"  {label}: {trials} trainings, {result.time_s:.1f} s", flush=True)
        rows.append(row(result, evaluate_values(task, result.best.values, SEEDS), "val_loss"))
    for label, grid in GRIDS[name].items():
        points = list(ParameterGrid(grid))
        result = run_points(task, points[:: 5 if quick else 1], method=label)
        print(f"  {label}: {result.trainings} trainings, {result.time_s:.1f} s", flush=True)
        rows.append(row(result, evaluate_values(task, result.best.values, SEEDS), "val_loss"))
        if name in CV_GRID:
            folds = config.task.cv_folds
            curve, evaluated = cv_grid(name, points[:: 5 if quick else 1], folds)
            print(f"  {curve.method}: {curve.trainings} trainings, {curve.time_s:.1f} s",
                  flush=True)
            rows.append(row(curve, evaluated, f"{folds}-fold CV loss", comparable=False))
        if label == REFINE[name]:
            curve, raw, picked = refine(name, quick, result)
            print(f"  grid+hd: {curve.trainings} trainings, {curve.time_s:.1f} s", flush=True)
            rows.append(row(curve, task.evaluate(raw, seeds=SEEDS), picked))
    return {"task": name, "hparams": task.hparams.numel, "sizes": task.info["sizes"],
            "trials": trials, "per_coordinate": per, "methods": rows,
            "reach": reach_times(rows)}


def reach_times(rows: list[dict]) -> dict:
    """When each hyperdiff variant first reaches TPE's best validation loss (or random's),
    against the time the reference itself took to reach it (its ``time_to_best_s``; until s39
    its whole run's time, which made hyperdiff look faster where TPE found its best early)."""
    by = {r["method"]: r for r in rows}
    ref = by.get("tpe") or by["random"]
    target = ref["best_val_loss"]
    out = {"reference": ref["method"], "target_val_loss": target,
           "reference_time_s": ref["time_to_best_s"], "reference_run_s": ref["time_s"]}
    for label, r in by.items():
        if not label.startswith("hd") or r["curve"] is None:
            continue
        curve = r["curve"]
        hit = next((i for i, b in enumerate(curve["best"]) if b <= target), None)
        t = None if hit is None else curve["time_s"][hit]
        out[label] = {"time_s": t, "trainings": None if hit is None else curve["trainings"][hit],
                      "fraction_of_reference_time": None if t is None
                      else t / ref["time_to_best_s"]}
    return out


def table(block: dict) -> str:
    lines = [f"{block['task']} ({block['hparams']} hyperparameters; black-box: {block['trials']}"
             f" trials{', per coordinate' if block['per_coordinate'] else ', shared values'})",
             f"{'method':<13}{'runs':>6}{'wall s':>8}{'best val':>10}{'t best s':>9}"
             f"{'win sel':>9}{'test loss':>11}{'test acc':>10}"]
    for r in block["methods"]:
        val = "-" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f}"
        sel = "-" if r["winner_selection_loss"] is None else f"{r['winner_selection_loss']:.4f}"
        lines.append(f"{r['method']:<13}{r['trainings']:>6}{r['time_s']:>8.1f}{val:>10}"
                     f"{r['time_to_best_s']:>9.1f}{sel:>9}{r['test_loss']:>11.4f}"
                     f"{r['test_accuracy']:>10.4f}")
    reach = block["reach"]
    lines.append(f"target: {reach['reference']}'s best val loss {reach['target_val_loss']:.4f} "
                 f"in {reach['reference_time_s']:.1f} s")
    for label, hit in reach.items():
        if isinstance(hit, dict):
            text = ("never" if hit["time_s"] is None else
                    f"{hit['time_s']:.1f} s = {hit['fraction_of_reference_time']:.3f} x, "
                    f"{hit['trainings']} trainings")
            lines.append(f"  {label} reaches it: {text}")
    return "\n".join(lines)


def figure(blocks: list[dict]) -> Figure:
    fig = Figure(figsize=(11, 4 * len(blocks)))
    axes = fig.subplots(len(blocks), 2, squeeze=False)
    for (by_runs, by_time), block in zip(axes, blocks, strict=True):
        for r in block["methods"]:
            if r["curve"] is None:
                continue
            c, style = r["curve"], "--" if r["method"] == "grid+hd" else "-"
            for ax, x in ((by_runs, c["trainings"]), (by_time, c["time_s"])):
                ax.step(x, c["best"], style, where="post", label=r["method"])
        by_runs.set_xlabel("training runs")
        by_time.set_xlabel("wall time (s)")
        by_time.set_xscale("log")
        for ax in (by_runs, by_time):
            ax.set_ylabel("best validation loss so far")
            ax.set_yscale("log")
            ax.set_title(block["task"])
            ax.grid(alpha=0.3)
            for axis in (ax.yaxis, by_time.xaxis):
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
                axis.set_major_formatter(FormatStrFormatter("%g"))
                axis.set_minor_formatter(NullFormatter())
        by_runs.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="few trials (10 unless --trials) and steps (smoke run)")
    parser.add_argument("--trials", type=int,
                        help="black-box trials per method (default 200, --quick 10)")
    parser.add_argument("--tasks", nargs="+", default=["logistic_digits", "mlp_digits"])
    parser.add_argument("--out", default=str(RESULTS / "blackbox"),
                        help="output path without extension (.json and .png are written)")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the figure of a result")
    args = parser.parse_args()
    if args.replot:
        blocks = json.loads(Path(args.replot).read_text())["tasks"]
        path = Path(args.replot).with_suffix(".png")
        figure(blocks).savefig(path, dpi=110, bbox_inches="tight")
        print(f"wrote {path}")
        return
    trials = args.trials if args.trials is not None else 10 if args.quick else 200
    if trials < 1:
        parser.error(f"--trials must be >= 1 (got {trials})")
    torch.set_num_threads(1)
    blocks, started = [], time.perf_counter()
    for name in args.tasks:
        print(f"{name}:", flush=True)
        blocks.append(run_task(name, trials, args.quick))
    print()
    for block in blocks:
        print(table(block), end="\n\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"quick": args.quick, "total_time_s": time.perf_counter() - started,
               "threads": torch.get_num_threads(), "tasks": blocks}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=_json) + "\n")
    figure(blocks).savefig(out.with_suffix(".png"), dpi=110, bbox_inches="tight")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} "
          f"({payload['total_time_s']:.0f} s)")


def _json(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    main()
