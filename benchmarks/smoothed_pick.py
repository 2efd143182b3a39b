"""Would a model of the selection loss pick a better step than its observed minimum?

An offline run reports the step with the lowest selection loss. Each step's selection loss is
one training's, so where training is noisy the minimum is often a lucky draw (the winner's
curse: docs/driver.md, "Starts 10x and 100x off"). This script asks, on finished run
directories, whether choosing the step by a smoothed loss instead would test better:

- fit a Gaussian process to the ok steps' ``(u_s, y_s)``, ``u_s`` the flattened raw values (log
  units for a positive hyperparameter), ``y_s`` a transform of the selection loss (``log``, or
  ``bilog``: ``sign(z) log(1 + |z|)`` of ``z = (y - median) / (1.4826 MAD)``, robust to a
  diverging step); kernel ``c^2 RBF(l) + noise`` with the length ``l`` bounded below (0.3 log
  units: without a bound the fit explains the noise by a short length and interpolates it),
  hyperparameters by maximum likelihood (scikit-learn, 3 restarts, ``random_state=0``);
- pick the visited step with the lowest posterior mean;
- or, simpler (``local r`` variants), score each visited step by the mean selection loss of the
  visited steps within ``r`` raw units of it in every coordinate (itself included) and pick the
  lowest score;
- or (``stable r`` variants) pick the lowest selection loss among the steps whose
  hypergradient norm is at most ``r x max(|L_val|, 1)``: a training near the edge of
  stability is chaotic in its hyperparameters, and its loss one draw of a wide spread;
- or (``top k x c`` variants) train each of the ``k`` steps with the lowest selection loss ``c``
  more times at its values, on the minibatch seeds ``outer.confirm`` would use
  (:func:`~hyperdiff.seeds.confirm_seed`), and pick the lowest mean of its ``1 + c`` selection
  losses: ``outer.confirm`` applied once, at the end, to the finalists;
- retrain at its recorded values with the run's report seeds and compare the held-out test loss
  with the run's own best step's (``result.json``).

Nothing here changes a run: it reads ``config.toml`` (verified against the run's manifest), the
history and ``result.json`` through :class:`~hyperdiff.app.rundir.RunDir`.
The runs are the default offline runs of the suite's tasks, e.g.::

    OMP_NUM_THREADS=1 hyperdiff run --task benchmarks/suite_tasks/gru_seq.py:build_lr_x0p1 --out runs/gru_x0p1
    OMP_NUM_THREADS=1 python benchmarks/smoothed_pick.py runs/* --out /tmp/picks.json  # the GP
    OMP_NUM_THREADS=1 python benchmarks/smoothed_pick.py runs/* --variants "iso log" "iso bilog" \
        "ard bilog" "local 0.1" "local 0.25" "local 0.5" "top 3 x 2" "top 5 x 1" "top 3 x 4" \
        --out /tmp/picks.json  # and local means, and the finalists trained again

(``benchmarks/results/smoothed_pick_s33.json``: the 26 suite rows at ``outer.seed`` 0;
``smoothed_pick_seeds_s33.json``: the 4-hyperparameter tasks' own starts at seeds 1-4;
``smoothed_pick_10seeds_s33.json``: the 4-hyperparameter runs of both, every pick retrained on
10 report seeds, ``--report-seeds 10``.)

Prints one row per run and variant (test loss of the run's best step, of the smoothed pick,
their ratio) and the geometric mean of the ratios per variant; writes ``--out`` (per run and
variant: the step, its selection loss, its score: the posterior mean, the local mean or the
mean with its confirmations).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

from hyperdiff.app.config import load_config
from hyperdiff.app.rundir import RunDir
from hyperdiff.app.tasks import build_task
from hyperdiff.seeds import confirm_seed, report_seeds
from hyperdiff.tuner.stopping import calm

VARIANTS: dict[str, dict[str, Any]] = {
    "iso log": {"ard": False, "transform": "log"},
    "iso bilog": {"ard": False, "transform": "bilog"},
    "ard bilog": {"ard": True, "transform": "bilog"},
    "local 0.1": {"radius": 0.1},
    "local 0.25": {"radius": 0.25},
    "local 0.5": {"radius": 0.5},
    "top 3 x 2": {"top": 3, "count": 2},
    "top 5 x 1": {"top": 5, "count": 1},
    "top 3 x 4": {"top": 3, "count": 4},
    "stable 10": {"stable": 10.0},
    "stable 30": {"stable": 30.0},
    "stable 100": {"stable": 100.0},
}
"""Variant name -> GP options (one length for all coordinates or one each, the loss transform),
a local mean's radius, the finalists and their extra trainings, or the largest hypergradient
norm of a step that may be picked, as a multiple of ``max(|its validation loss|, 1)``."""
DEFAULT_VARIANTS = ("iso log", "iso bilog", "ard bilog")
MIN_LENGTH = 0.3


def transformed(y: np.ndarray, transform: str) -> np.ndarray:
    """``log y`` or the robust ``bilog`` of the standardized ``y`` (see the module doc)."""
    if transform == "log":
        return np.log(y)
    median = float(np.median(y))
    scale = 1.4826 * float(np.median(np.abs(y - median))) or 1.0
    z = (y - median) / scale
    return np.sign(z) * np.log1p(np.abs(z))


def smoothed_pick(x: np.ndarray, y: np.ndarray, *, ard: bool, transform: str
                  ) -> tuple[int, np.ndarray, str]:
    """Index of the lowest GP posterior mean among the rows of ``x`` (n, d), the means, the
    fitted kernel."""
    length = np.ones(x.shape[1]) if ard else 1.0
    kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * RBF(length, (MIN_LENGTH, 1e2))
              + WhiteKernel(0.1, (1e-6, 1e1)))
    gp = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=3,
                                  random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(x, transformed(y, transform))
    mean = gp.predict(x)
    return int(np.argmin(mean)), mean, str(gp.kernel_)


def local_pick(x: np.ndarray, y: np.ndarray, *, radius: float) -> tuple[int, np.ndarray, str]:
    """Index of the lowest mean of ``y`` over the rows within ``radius`` of each row of ``x``
    (max-norm), the means, and a description."""
    near = np.abs(x[:, None, :] - x[None, :, :]).max(-1) <= radius  # (n, n), diagonal true
    mean = (near * y[None, :]).sum(1) / near.sum(1)
    return int(np.argmin(mean)), mean, f"local mean within {radius:g}"


def stable_pick(records: list[Any], y: np.ndarray, *, stable: float
                ) -> tuple[int, np.ndarray, str]:
    """Index of the lowest ``y`` among the steps whose hypergradient norm is at most ``stable``
    x ``max(|validation loss|, 1)`` (a step without a hypergradient, a plain point of the
    global phase, may be picked), the scores (``inf`` where not), and a description; all steps
    when none qualifies."""
    quiet = np.array([calm(r.grad_norm, r.val_loss, stable) for r in records])
    score = np.where(quiet, y, np.inf) if quiet.any() else y
    return int(np.argmin(score)), score, f"hypergradient norm <= {stable:g} x max(|L_val|, 1)"


def run_rows(run: Path, variants: tuple[str, ...] = DEFAULT_VARIANTS,
             report: int | None = None) -> dict[str, Any]:
    """Every variant's pick on ``run`` and the test loss at it (retrained when it differs);
    ``report``: retrain every pick, the run's own best step too, on that many report seeds
    instead of the run's (``result.json``'s test loss is then not used)."""
    rundir = RunDir.existing(run)
    config = load_config(rundir.config_path(), stored=True)
    task = build_task(config.task.name, steps=config.inner.steps,
                      selection_fraction=config.task.selection_fraction,
                      data_seed=config.task.data_seed)
    result = rundir.read_result()
    if result is None:
        raise SystemExit(f"{run}: the run has no result.json (not finished)")
    records = rundir.read_history()
    ok = [r for r in records if r.status == "ok" and r.selection_loss is not None
          and math.isfinite(r.selection_loss)]
    raws = [task.hparams.with_natural(**{k: torch.tensor(v, dtype=torch.float64)
                                          for k, v in r.hparams.items()}).raw for r in ok]
    x = np.stack([task.hparams.flatten(raw).double().numpy() for raw in raws])
    y = np.array([r.selection_loss for r in ok])
    best, best_test = result["best_step"], result["tuned"]["metrics"]["test"]["loss"]
    seeds = report_seeds(config.report.seeds if report is None else report)
    if report is not None:
        index = next(i for i, r in enumerate(ok) if r.step == best)
        best_test = task.evaluate_all([raws[index]], seeds=seeds)[0]["test"]["loss"]
    out: dict[str, Any] = {"run": str(run), "task": config.task.name, "steps": len(records),
                           "report_seeds": list(seeds), "best_step": best,
                           "best_test": best_test, "variants": {}}
    tested: dict[int, float] = {best: best_test}
    confirmations: dict[tuple[int, int], float] = {}  # (index, k) -> selection loss

    def confirmed_pick(top: int, count: int) -> tuple[int, np.ndarray, str]:
        finalists = [int(i) for i in np.argsort(y, kind="stable")[:top]]
        mean = np.full(len(y), np.inf)
        for i in finalists:
            for k in range(count):
                if (i, k) not in confirmations:
                    seed = confirm_seed(config.outer.seed, ok[i].step, k)
                    metrics = task.evaluate_all([raws[i]], seeds=(seed,))[0]
                    confirmations[i, k] = metrics["selection"]["loss"]
            mean[i] = (y[i] + sum(confirmations[i, k] for k in range(count))) / (1 + count)
        return int(np.argmin(mean)), mean, f"top {top} x {count}"

    for name in variants:
        options = VARIANTS[name]
        if "top" in options:
            index, mean, kernel = confirmed_pick(**options)
        elif "stable" in options:
            index, mean, kernel = stable_pick(ok, y, **options)
        else:
            pick = local_pick if "radius" in options else smoothed_pick
            index, mean, kernel = pick(x, y, **options)
        step = ok[index].step
        if step not in tested:
            tested[step] = task.evaluate_all([raws[index]], seeds=seeds)[0]["test"]["loss"]
        out["variants"][name] = {"step": step, "selection_loss": float(y[index]),
                                 "score": float(mean[index]), "kernel": kernel,
                                 "test": tested[step], "ratio": tested[step] / best_test}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished offline run directories")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=list(DEFAULT_VARIANTS), help="the picks to compare")
    parser.add_argument("--report-seeds", type=int, metavar="N",
                        help="retrain every pick and the run's own best step on N report seeds "
                        "(default: the run's own report, report.seeds)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/smoothed_pick.json"))
    args = parser.parse_args()
    if args.report_seeds is not None and args.report_seeds < 1:
        parser.error(f"--report-seeds must be >= 1 (got {args.report_seeds})")
    variants = tuple(args.variants)
    torch.set_num_threads(1)
    rows = []
    for run in args.runs:
        rows.append(run_rows(run, variants, args.report_seeds))
        r = rows[-1]
        picks = "  ".join(f"{n}: step {v['step']} {v['test']:.4f} ({v['ratio']:.3f})"
                          for n, v in r["variants"].items())
        print(f"{run.name:40s} best step {r['best_step']:2d} {r['best_test']:.4f}  {picks}",
              flush=True)
    summary = {}
    for name in variants:
        ratios = [r["variants"][name]["ratio"] for r in rows]
        summary[name] = {"geomean_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                         "better": sum(q < 1 - 1e-9 for q in ratios),
                         "worse": sum(q > 1 + 1e-9 for q in ratios), "runs": len(ratios)}
        s = summary[name]
        print(f"{name:10s}: geometric mean {s['geomean_ratio']:.3f}, {s['better']} better, "
              f"{s['worse']} worse of {s['runs']}")
    args.out.write_text(json.dumps({"min_length": MIN_LENGTH, "report_seeds": args.report_seeds,
                                    "variants": {n: VARIANTS[n] for n in variants},
                                    "runs": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
