"""Discrete hyperparameters on ``arch_digits``: relax / gumbel / reinforce against TPE and random.

The task (src/hyperdiff/app/tasks/arch_digits.py): an MLP on digits choosing depth {1,2,3}, width
{16,32,64,128} and activation {relu,tanh,gelu} while tuning the SGD learning rate and weight
decay. For each hyperdiff mode and each black-box search, and each of 3 seeds (the outer seed
of hyperdiff, the sampler seed of the searches), the *current* configuration after every outer
step / trial (hyperdiff: the best step by selection loss; searches: the best trial by
validation loss) is discretised (argmax choices), retrained from scratch on a fresh seed and
scored on the held-out test split (mean of 3 retraining seeds). Curves: mean test loss over the 3 seeds against trainings
and wall time. Target: a hyperdiff mode reaches TPE's 100-trial test loss in <= 1/4 of TPE's
trainings. Every hyperdiff mode runs from two starts: the task's default (uniform
probabilities, whose argmax ties pick the first choices: depth 1, width 16, relu) and a poor one
(probability 0.7-0.8 on depth 3, width 16, gelu). Also reported: the relaxation gap of relax's final logits (relaxed vs discretised
model, both retrained on 3 seeds).

    OMP_NUM_THREADS=1 python benchmarks/discrete.py          # full run (~10-15 min, 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/discrete.py --quick  # smoke run (1 seed, short)
    OMP_NUM_THREADS=1 python benchmarks/discrete.py --starts poor --outer-lr 0.3 --no-search \
        --out benchmarks/results/discrete_poor_lr03.json   # the poor start, faster outer lr

Writes benchmarks/results/discrete.json (``--out``: elsewhere). ``--no-search`` takes its target
from that file's full run, read before the runs; refused with ``--quick`` (other steps).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hyperdiff.app.discrete_report import relaxation_gap
from hyperdiff.app.search import optuna_available, random_search, tpe_search
from hyperdiff.app.tasks.arch_digits import build
from hyperdiff.seeds import report_seeds
from hyperdiff.tuner.driver import HyperOptimizer, Stopping

RESULTS = Path(__file__).resolve().parent / "results" / "discrete.json"
"""The full run's result; ``--no-search`` takes its target from it."""

REPORT_SEEDS = report_seeds(3)
STARTS: dict[str, dict[str, Any]] = {  # initial values of the hyperdiff runs
    "default": {},  # uniform probabilities (argmax ties: the first choice), lr 0.1, wd 1e-4
    "poor": {"depth": [0.1, 0.1, 0.8], "width": [0.7, 0.1, 0.1, 0.1],
             "activation": [0.1, 0.1, 0.8]},  # argmax depth 3, width 16, gelu
}
MODES = {  # mode -> (samples, baseline, outer steps); chosen in the runs recorded in the docs
    "relax": (1, "moving_average", 40),
    "gumbel": (1, "moving_average", 40),
    "reinforce": (4, "leave_one_out", 12),
}


def test_loss(task: Any, raw: dict[str, torch.Tensor], cache: dict[str, float]) -> float:
    """Held-out test loss of the discretised configuration at ``raw``, retrained on 3 seeds."""
    key = json.dumps({n: [round(float(x), 9) for x in v.reshape(-1)] for n, v in raw.items()})
    if key not in cache:
        cache[key] = task.evaluate(raw, seeds=REPORT_SEEDS)["test"]["loss"]
    return cache[key]


def run_mode(mode: str, seed: int, steps: int, quick: bool, start: str, outer_lr: float
             ) -> dict[str, Any]:
    samples, baseline, outer_steps = MODES[mode]
    outer_steps = max(3, outer_steps // 4) if quick else outer_steps
    task = build(steps=steps, mode=mode, baseline=baseline).build()
    problems = [replace(p, hparams=p.hparams.with_natural(**STARTS[start]))
                for p in task.problems]
    # Adam: the outer optimizer of docs/discrete.md's numbers (before signstep was the default)
    driver = HyperOptimizer(problems, optimizer="adam", lr=outer_lr, samples=samples,
                            schedule="constant",
                            selection=task.selection, seed=seed,
                            stopping=Stopping(max_steps=outer_steps))
    cache: dict[str, float] = {}
    curve: dict[str, list[float]] = {"trainings": [], "time_s": [], "test_loss": []}
    while driver.stop_reason() is None:
        driver.step()
        curve["trainings"].append(driver.trainings)
        curve["time_s"].append(driver.elapsed)
        curve["test_loss"].append(test_loss(task, driver.result().best_raw, cache))
    result = driver.result()
    out = {"curve": curve, "stop_reason": result.stop_reason,
           "initial_test_loss": test_loss(task, problems[0].hparams.raw, cache), "choices": result.best_hparams.best(),
           "probabilities": {n: result.best_hparams.natural()[n].tolist()
                             for n in ("depth", "width", "activation")},
           "lr": float(result.best_hparams.natural()["lr"]),
           "weight_decay": float(result.best_hparams.natural()["weight_decay"])}
    if mode == "relax":
        gap = relaxation_gap(task, result.best_raw, seeds=REPORT_SEEDS)
        out["relaxation_gap"] = {k: gap[k] for k in ("relaxed", "discretised", "gap")}
    return out


def run_search(name: str, seed: int, steps: int, trials: int) -> dict[str, Any]:
    task = build(steps=steps).build()
    search = tpe_search if name == "tpe" else random_search
    result = search(task, trials, seed=seed)
    cache: dict[tuple, float] = {}
    curve: dict[str, list[float]] = {"trainings": [], "time_s": [], "test_loss": []}
    best = None
    for trial in result.trials:
        if best is None or trial.objective < best.objective:
            best = trial
        key = tuple(sorted(best.values.items()))
        if key not in cache:
            cache[key] = task.evaluate_values(best.values, REPORT_SEEDS)["test"]["loss"]
        curve["trainings"].append(trial.trainings)
        curve["time_s"].append(trial.time_s)
        curve["test_loss"].append(cache[key])
    assert best is not None
    return {"curve": curve, "best_values": best.values, "best_val_loss": best.objective}


def mean_curve(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Mean over seeds after each step; a run that stopped early (patience) keeps its last
    configuration, its trainings and time stay where it stopped."""
    length = max(len(r["curve"]["trainings"]) for r in runs)

    def at(run: dict[str, Any], key: str, i: int) -> float:
        values = run["curve"][key]
        return values[min(i, len(values) - 1)]

    out = {key: [sum(at(r, key, i) for r in runs) / len(runs) for i in range(length)]
           for key in ("trainings", "time_s", "test_loss")}
    out["trainings_axis"] = max((r["curve"]["trainings"] for r in runs), key=len)
    return out


def first_reaching(curve: dict[str, list[float]], target: float) -> tuple[int, float] | None:
    for trainings, time_s, loss in zip(curve["trainings_axis"], curve["time_s"],
                                       curve["test_loss"], strict=True):
        if loss <= target:
            return int(trainings), time_s
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, short runs")
    parser.add_argument("--out", default=str(RESULTS), help=f"result file (default: {RESULTS})")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="hyperdiff's outer lr")
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    parser.add_argument("--no-search", action="store_true",
                        help=f"skip random search and TPE; the target is the search's in {RESULTS}"
                        " (a full run: not with --quick)")
    args = parser.parse_args()
    seeds = (0,) if args.quick else (0, 1, 2)
    steps, trials = (40, 20) if args.quick else (100, 100)
    stored = None
    if args.no_search:  # read before the runs, and refused where its target is of other runs
        if not RESULTS.exists():
            parser.error(f"--no-search takes its target from {RESULTS}, which does not exist "
                         "(run the full benchmark first)")
        stored = json.loads(RESULTS.read_text())
        if stored["steps"] != steps:
            parser.error(f"--no-search takes its target from {RESULTS}, whose runs train "
                         f"T={stored['steps']} steps; this run trains T={steps}"
                         + (" (--quick): run --quick with the searches" if args.quick else ""))
    torch.set_num_threads(1)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    for start in args.starts:
        for mode in MODES:
            name = mode if start == "default" else f"{mode} ({start} start)"
            runs[name] = [run_mode(mode, s, steps, args.quick, start, args.outer_lr)
                          for s in seeds]
            print(f"{name}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    searches = [] if args.no_search else ["random"] + (["tpe"] if optuna_available() else [])
    for name in searches:
        runs[name] = [run_search(name, s, steps, trials) for s in seeds]
        print(f"{name}: done ({time.perf_counter() - started:.0f} s)", flush=True)

    curves = {name: mean_curve(r) for name, r in runs.items()}
    reference = "tpe" if "tpe" in curves else "random"
    if stored is not None:  # --no-search: the target of the stored full run
        reference, target = stored["reference"], stored["target_test_loss"]
        ref_trainings = stored["curves"][reference]["trainings"][-1]
    else:
        target = curves[reference]["test_loss"][-1]
        ref_trainings = curves[reference]["trainings"][-1]
    rows = []
    print(f"\narch_digits, T={steps}; test loss of the retrained discretised configuration, "
          f"mean of {len(seeds)} seeds; target: {reference}'s {ref_trainings}-training "
          f"test loss {target:.4f}")
    print(f"{'method':<26}{'trainings':>10}{'wall s':>9}{'initial':>9}{'final test':>12}"
          f"{'reaches target at':>20}{'fraction':>10}")
    for name, curve in curves.items():
        hit = first_reaching(curve, target)
        fraction = None if hit is None else hit[0] / ref_trainings
        initial = [r.get("initial_test_loss") for r in runs[name]]
        initial_mean = None if None in initial else sum(initial) / len(initial)
        rows.append({"method": name, "trainings": curve["trainings"][-1],
                     "initial_test_loss": initial_mean,
                     "time_s": curve["time_s"][-1], "final_test_loss": curve["test_loss"][-1],
                     "reaches_target_trainings": None if hit is None else hit[0],
                     "reaches_target_time_s": None if hit is None else hit[1],
                     "fraction_of_reference_trainings": fraction})
        where = "never" if hit is None else f"{hit[0]} ({hit[1]:.1f} s)"
        frac = "-" if fraction is None else f"{fraction:.2f}"
        init = "-" if initial_mean is None else f"{initial_mean:.4f}"
        print(f"{name:<26}{curve['trainings'][-1]:>10.1f}{curve['time_s'][-1]:>9.1f}{init:>9}"
              f"{curve['test_loss'][-1]:>12.4f}{where:>20}{frac:>10}")
    print("trainings, wall s: mean over seeds of what each run used (hyperdiff runs stop "
          "early after 10 steps without a better selection loss)")
    for name in runs:
        if "choices" in runs[name][0]:
            print(f"{name} choices per seed: {[r['choices'] for r in runs[name]]}; stopped: "
                  f"{[r['stop_reason'] for r in runs[name]]}")
    for name in searches:
        print(f"{name} best per seed: {[r['best_values'] for r in runs[name]]}")
    gaps = [r["relaxation_gap"] for r in runs.get("relax", [])]
    for g in gaps:
        print("relax relaxation gap (discretised - relaxed loss): "
              + ", ".join(f"{s} {v:+.4f}" for s, v in g["gap"].items()))
    out = {"task": "arch_digits", "steps": steps, "seeds": list(seeds), "quick": args.quick,
           "outer_lr": args.outer_lr, "starts": args.starts,
           "reference": reference, "target_test_loss": target, "rows": rows,
           "curves": curves, "runs": runs, "modes": {k: list(v) for k, v in MODES.items()},
           "total_time_s": time.perf_counter() - started}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"total {time.perf_counter() - started:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
