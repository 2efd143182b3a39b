"""What one offline outer step costs, against one plain training of the same length.

For each task, in one process (the task built as ``hyperdiff run --task ...`` builds it, with
the default config of an offline run but ``outer.explore = 0``: no global phase, whose points
are plain trainings), best of ``--repeats`` each:

- plain: one plain training at the start's values (the task's inner optimizer, same T steps
  and minibatches, no graph: ``trained_params``);
- hypergradient: the configured method called alone on the first problem (training plus the
  backward pass; no selection evaluation, no record);
- loop step: ``HyperOptimizer.step()`` after the first (the first step also evaluates the
  guard's untrained-loss reference, reported on its own as ``first loop step``);
- forward and truncated T/4 (tasks with at most ``FORWARD_MAX`` hyperparameters): forward
  mode, and backpropagation through the last T/4 inner steps (biased), called alone, to
  compare with the configured method's ``hypergradient``;
- cli step: ``run_experiment`` with ``stop.max_steps`` steps, the per-step time from the
  records' ``time_s`` differences (they include the history line, the checkpoint and the
  loggers of the previous step).

Then a cProfile breakdown of loop steps and of a CLI run by part (training + hypergradient,
selection evaluation, guard's untrained reference, record, checkpoint, data loading), as
shares of the profiled step time. Timings on a shared machine are noisy: compare ratios
measured in the same run only.

    OMP_NUM_THREADS=1 python benchmarks/outer_step_cost.py            # four tasks
    OMP_NUM_THREADS=1 python benchmarks/outer_step_cost.py --quick    # two, fewer repeats
    OMP_NUM_THREADS=1 python benchmarks/outer_step_cost.py --tasks mlp_digits --update
        # that task's block measured again, the file's other blocks kept

Writes benchmarks/results/outer_step_cost.json (``--out``: elsewhere); each task's block
records when it was measured and the load average before and after.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import math
import os
import platform
import pstats
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment
from hyperdiff.app.plans import build
from hyperdiff.app.tasks.base import trained_params
from hyperdiff.methods.registry import make_method

HERE = Path(__file__).resolve().parent
TASKS = {
    "mlp_digits": "mlp_digits",
    "reweight_digits": "reweight_digits",
    "gru_seq": f"{HERE / 'suite_tasks' / 'gru_seq.py'}:build",
    "tabular_mlp": f"{HERE / 'suite_tasks' / 'tabular_mlp.py'}:build",
}
FORWARD_MAX = 8  # forward mode is timed on tasks with at most this many hyperparameters
# (part, the functions whose cumulative time is that part); profiled functions are matched by
# (file name ending, function name)
PARTS: list[tuple[str, list[tuple[str, str]]]] = [
    ("training + hypergradient", [("methods/base.py", "__call__")]),
    ("selection evaluation", [("tuner/sampler.py", "selection_loss")]),
    ("guard's untrained reference", [("tuner/guard.py", "untrained_losses")]),
    ("guard snapshot", [("tuner/driver.py", "_snapshot")]),
    ("record", [("tuner/driver.py", "_make_record"), ("rundir/directory.py", "append")]),
    ("checkpoint write", [("rundir/directory.py", "save_checkpoint"),
                          ("tuner/driver.py", "state_dict")]),
    ("data loading", [("data/sources.py", "batch"),
                      ("data/streaming.py", "batch")]),
]


def config_for(ref: str, steps: int) -> Any:
    """The default offline config without the global phase: its points (steps 1..8 after a
    weak start, as ``mlp_digits``'s) are plain trainings without a hypergradient, and the
    steps timed here are the gradient phase's."""
    return load_config(overrides=[f"task.name={ref}", "outer.mode=offline",
                                  f"stop.max_steps={steps}", "stop.patience=0",
                                  "outer.explore=0"])


def timed(run: Callable[..., Any], *args: Any) -> float:
    started = time.perf_counter()
    run(*args)
    return time.perf_counter() - started


def best_of(kinds: dict[str, Callable[[int], Any]], repeats: int) -> dict[str, float]:
    """Each kind's best wall time over ``repeats`` interleaved rounds (``run(i)`` in round
    ``i``), after a warm-up round."""
    best = {kind: math.inf for kind in kinds}
    for i in range(repeats + 1):
        for kind, run in kinds.items():
            seconds = timed(run, i)
            if i > 0:  # round 0 warms up
                best[kind] = min(best[kind], seconds)
    return best


def cli_steps(ref: str, steps: int, workdir: Path) -> list[float]:
    """Per-step wall times of a CLI run (``time_s`` differences, the first step excluded)."""
    records: list[Any] = []
    run_experiment(config_for(ref, steps + 1), out=workdir / f"run-{time.time_ns()}",
                   progress=False, log=lambda _m: None,
                   callbacks=[lambda _o, record: records.append(record)])
    times = [r.time_s for r in records]
    return [b - a for a, b in itertools.pairwise(times)]


def profile_parts(run: Callable[[], Any]) -> tuple[dict[str, float], float]:
    """Seconds spent in each part of :data:`PARTS` while ``run()`` runs (cumulative times)
    and the whole run's (profiled) seconds;
    nested parts (a batch drawn inside a training) are counted in both."""
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    run()
    profiler.disable()
    total = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    parts: dict[str, float] = {}
    for part, keys in PARTS:
        parts[part] = sum(cumulative for (file, _line, name), (_c, _n, _t, cumulative, _callers)
                          in stats.items()
                          if (_tail(file), name) in keys)
    return parts, total


def _tail(file: str) -> str:
    """``folder/file.py`` of a profiled file's path."""
    return "/".join(Path(file).parts[-2:])


def measure_task(name: str, ref: str, repeats: int, workdir: Path) -> dict[str, Any]:
    """One task's timings: each kind once to warm up, then ``repeats`` interleaved rounds
    (best of each kind), then the profiles."""
    task, loop = build(config_for(ref, 2 * repeats + 2))
    problem, raw = loop.problems[0], loop.raw
    first = timed(loop.step)  # with the guard's untrained reference
    kinds: dict[str, Callable[[int], Any]] = {
        "plain": lambda i: trained_params(problem, raw, seed=i),
        "hypergradient": lambda i: loop.method(replace(problem, seed=i), raw),
        "loop step": lambda _i: loop.step(),
    }
    if task.hparams.numel <= FORWARD_MAX:  # few hyperparameters: forward mode's k tangents
        forward = make_method("forward")
        kinds["forward"] = lambda i: forward(replace(problem, seed=i), raw)
        truncated = make_method("truncated", k=max(1, problem.steps // 4))
        kinds["truncated T/4"] = lambda i: truncated(replace(problem, seed=i), raw)
    best = best_of(kinds, repeats)
    trainings = loop.history[-1].samples * len(loop.problems)
    best["cli step"] = min(cli_steps(ref, repeats + 1, workdir)[1:])
    _, profiled = build(config_for(ref, 4))
    profiled.step()  # the untrained reference is measured on the first step
    loop_parts, loop_total = profile_parts(profiled.step)
    cli_parts, cli_total = profile_parts(lambda: cli_steps(ref, 2, workdir))
    plain = best["plain"]
    return {
        "task": name, "reference": ref, "hparams": task.hparams.numel, "steps": problem.steps,
        "method": type(loop.method).__name__, "selection": loop.selection is not None,
        "trainings_per_step": trainings, "first_loop_step_s": first,
        **{f"{kind.replace(' ', '_')}_s": seconds for kind, seconds in best.items()},
        "ratios": {"hypergradient": best["hypergradient"] / plain,
                   "first loop step": first / plain, "loop step": best["loop step"] / plain,
                   "loop step per training": best["loop step"] / plain / trainings,
                   "cli step": best["cli step"] / plain,
                   "cli step per training": best["cli step"] / plain / trainings,
                   **{kind: best[kind] / plain for kind in ("forward", "truncated T/4")
                      if kind in best}},
        "loop_profile_s": loop_parts, "loop_profile_total_s": loop_total,
        "cli_profile_s": cli_parts, "cli_profile_total_s": cli_total,
    }


def table(blocks: list[dict[str, Any]]) -> str:
    head = ["task", "k", "T", "trainings", "plain s", "hypergrad", "1st step", "loop step",
            "per train", "cli step", "per train", "forward", "trunc T/4"]
    lines = [[b["task"], str(b["hparams"]), str(b["steps"]), str(b["trainings_per_step"]),
              f"{b['plain_s']:.3f}",
              *(f"{b['ratios'][k]:.2f}x" for k in ("hypergradient", "first loop step",
                                                    "loop step", "loop step per training",
                                                    "cli step", "cli step per training")),
              *(f"{b['ratios'][k]:.2f}x" if k in b["ratios"] else "-"
                for k in ("forward", "truncated T/4"))]
             for b in blocks]
    out = [_row(head), _row(["-" * len(h) for h in head]), *map(_row, lines)]
    out.append("\nloop step by part (profiled; share of one profiled step):")
    for b in blocks:
        total = b["loop_profile_total_s"]
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in b["loop_profile_s"].items() if v)
        out.append(f"  {b['task']}: {total:.3f} s: {shares}")
    out.append("cli run of 3 steps by part (whole run incl. start-up; share):")
    for b in blocks:
        total = b["cli_profile_total_s"]
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in b["cli_profile_s"].items() if v)
        out.append(f"  {b['task']}: {total:.3f} s: {shares}")
    return "\n".join(out)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(f"{c:>10}" for c in cells) + " |"


def updated(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` (a result of this script) with the task blocks of ``new`` in place of its
    blocks of the same tasks (new tasks after them); refused where the two differ in
    anything but their blocks (repeats, torch, threads, machine: rows measured otherwise)."""
    differ = sorted(k for k in {*old, *new} - {"tasks"} if old.get(k) != new.get(k))
    if differ:
        raise SystemExit("outer_step_cost: --update needs the file's settings (got other "
                         + ", ".join(f"{k} {new.get(k)!r} against {old.get(k)!r}"
                                     for k in differ) + ")")
    fresh = {b["task"]: b for b in new["tasks"]}
    blocks = [fresh.pop(b["task"], b) for b in old["tasks"]]
    return {**old, "tasks": blocks + list(fresh.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tasks mlp_digits and reweight_digits (unless --tasks), 2 repeats "
                        "(unless --repeats)")
    parser.add_argument("--repeats", type=int, help="rounds per kind (default 3, --quick 2)")
    parser.add_argument("--tasks", nargs="*", default=None, choices=list(TASKS))
    parser.add_argument("--out", default=str(HERE / "results" / "outer_step_cost.json"))
    parser.add_argument("--update", action="store_true",
                        help="replace only the measured tasks' blocks in --out, keep its others "
                        "(the file's repeats, torch, threads and machine must be this run's)")
    args = parser.parse_args()
    names = args.tasks or (["mlp_digits", "reweight_digits"] if args.quick else list(TASKS))
    repeats = args.repeats if args.repeats is not None else 2 if args.quick else 3
    if repeats < 1:
        parser.error(f"--repeats must be >= 1 (got {repeats})")
    out = Path(args.out)
    header = {"repeats": repeats, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine()}
    if args.update:  # refused before the measurements, not after
        if not out.exists():
            parser.error(f"--update: {out} does not exist")
        updated(json.loads(out.read_text()), {**header, "tasks": []})
    blocks = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:  # each task's kinds interleaved; ratios only within one task
            load = os.getloadavg()
            blocks.append({**measure_task(name, TASKS[name], repeats, Path(tmp)),
                           "measured": time.strftime("%Y-%m-%d %H:%M %Z"),
                           "load_average_before": load, "load_average_after": os.getloadavg()})
            print(f"{name} done", flush=True)
    print(table(blocks))
    payload = {**header, "tasks": blocks}
    if args.update:
        payload = updated(json.loads(out.read_text()), payload)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
