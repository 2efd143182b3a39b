"""What tuning theta_0 (``hd.initialization``) costs per meta-gradient, against plain autograd.

One sinusoid task (``hyperdiff.app.tasks.few_shot.sinusoid_task``, 10 shots, 10 queries), the
MAML model 1-40-40-1 ReLU (1761 parameters), ``--steps`` inner SGD steps with lr 0.01. Timed
side by side in one process, interleaved over ``--repeats`` rounds in rotated order (best of
n):

- ``hand-written``: MAML's meta-gradient by plain autograd over an explicitly written SGD
  loop (``create_graph=True``), the baseline;
- ``reverse`` / ``checkpointed`` / ``forward`` with ``theta0 = hd.initialization`` and a
  scalar learning rate: the same meta-gradient through hyperdiff (its maximum difference from
  the hand-written one is printed);
- the same methods without the initialization (the scalar learning rate only): what the
  initialization adds to a method.

Timings on a shared machine are noisy: the table gives the best wall time and the best CPU
time of the process (single-threaded, so it does not count the time other processes take the
core); the ratios within one run are the point.

    OMP_NUM_THREADS=1 python benchmarks/initialization.py

Writes benchmarks/results/initialization.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hyperdiff as hd
from hyperdiff.app.tasks.few_shot import sinusoid_task

LR = 0.01


def model_params() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                                 torch.nn.ReLU(), torch.nn.Linear(40, 1))
    return {k: v.detach() for k, v in module.named_parameters()}


def net(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(torch.addmm(p["0.bias"], x, p["0.weight"].T))
    h = torch.relu(torch.addmm(p["2.bias"], h, p["2.weight"].T))
    return torch.addmm(p["4.bias"], h, p["4.weight"].T)


def loss(p, h, batch) -> torch.Tensor:
    return ((net(p, batch[0]) - batch[1]) ** 2).mean()


def hand_written(params, task, steps: int) -> torch.Tensor:
    """MAML's meta-gradient by plain autograd: the baseline."""
    theta0 = {n: p.clone().requires_grad_() for n, p in params.items()}
    theta = dict(theta0)
    for _ in range(steps):
        grads = torch.autograd.grad(loss(theta, None, task.support), list(theta.values()),
                                    create_graph=True)
        theta = {n: v - LR * g for (n, v), g in zip(theta.items(), grads, strict=True)}
    grads = torch.autograd.grad(loss(theta, None, task.query), list(theta0.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def problem(params, task, steps: int, with_init: bool) -> hd.Problem:
    kinds = {"lr": hd.scalar(LR)}
    if with_init:
        kinds = {"theta0": hd.initialization(params), **kinds}
    return hd.make_problem(loss, loss, hd.HyperParameters(kinds), params,
                           optimizer=hd.sgd("lr"), train_data=task.support,
                           val_data=task.query, steps=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/initialization.json")
    args = parser.parse_args()
    params, task = model_params(), sinusoid_task(0, shots=10)
    problems = {True: problem(params, task, args.steps, True),
                False: problem(params, task, args.steps, False)}
    methods = {"reverse": hd.reverse(), "checkpointed": hd.checkpointed(),
               "forward": hd.forward()}
    runs = {"hand-written": lambda: hand_written(params, task, args.steps)}
    for name, method in methods.items():
        runs[f"{name} + theta0"] = lambda m=method: m(problems[True])
        runs[name] = lambda m=method: m(problems[False])
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(args.repeats):  # rotated: no run always follows forward + theta0's
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    reference = hand_written(params, task, args.steps)
    baseline, baseline_cpu = min(times["hand-written"]), min(cpu["hand-written"])
    rows = []
    for name in runs:
        best, best_cpu = min(times[name]), min(cpu[name])
        error = None
        if name.endswith("theta0"):
            error = float((runs[name]().grad["theta0"] - reference).abs().max())
        rows.append({"run": name, "time_s": best, "vs_hand_written": best / baseline,
                     "cpu_s": best_cpu, "cpu_vs_hand_written": best_cpu / baseline_cpu,
                     "max_abs_diff": error})
    print(f"sinusoid 1-40-40-1, {args.steps} inner steps, best of {args.repeats} (float32; "
          "CPU time: the process's own, robust to a loaded machine)")
    print(f"{'run':<24}{'wall ms':>10}{'x hand':>9}{'CPU ms':>10}{'x hand':>9}{'max |diff|':>13}")
    for row in rows:
        diff = "" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.2e}"
        print(f"{row['run']:<24}{1e3 * row['time_s']:>10.2f}{row['vs_hand_written']:>9.2f}"
              f"{1e3 * row['cpu_s']:>10.2f}{row['cpu_vs_hand_written']:>9.2f}{diff:>13}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "repeats": args.repeats,
                               "torch_threads": torch.get_num_threads(), "rows": rows},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
