"""What one meta-step costs: hyperdiff's meta plan against a hand-written autograd MAML step.

The sinusoid tasks of Finn et al. 2017 (``hyperdiff.app.tasks.few_shot.sinusoid_task``, 10
shots, 10 queries), the 1-40-40-1 ReLU model (1761 parameters), ``--steps`` inner SGD steps at
lr 0.01, a meta-batch of ``--batch`` tasks, Adam (lr 1e-3) on theta_0. Every row runs the same
tasks (``seeds.meta_task``) in the same process, interleaved over ``--repeats`` rounds in
rotated order (best of n):

- ``hand-written MAML``: the peer baseline, plain autograd over an explicitly written SGD loop
  per task (``create_graph=True``), the query losses' gradients averaged, one Adam step;
- ``hyperdiff <method>``: one ``HyperOptimizer.step()`` with ``hd.plans.MetaPlan`` (records,
  guard and checks included): exact MAML by ``reverse`` and ``checkpointed``, first-order MAML,
  Reptile, and iMAML (``implicit`` with CG on the proximal problem, strength 2);
- ``higher`` / ``TorchOpt``: their MAML formulation, skipped with a note when not installed.

Peak memory is torch's own CPU allocations during one step (``hd.diagnose.peak_memory``),
measured at ``--steps`` and at ``--long-steps`` inner steps: exact reverse mode grows with
the steps, first-order methods and iMAML do not. Timings on a shared machine are noisy: the
table gives the best wall time and the best CPU time of the process (single-threaded).

    OMP_NUM_THREADS=1 python benchmarks/meta.py

Writes benchmarks/results/meta.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import hyperdiff as hd
from hyperdiff.app.tasks.few_shot import sinusoid_task
from hyperdiff.diagnose.check import peak_memory
from hyperdiff.hparams.initialization import proximal
from hyperdiff.seeds import meta_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from initialization import model_params, net  # the same model and forward

LR, OUTER_LR, STRENGTH, SEED = 0.01, 1e-3, 2.0, 0


def mse(p, h, batch) -> torch.Tensor:
    return ((net(p, batch[0]) - batch[1]) ** 2).mean()


def imaml_loss(p, h, batch) -> torch.Tensor:
    return mse(p, h, batch) + proximal(p, h, "theta0", STRENGTH)


def sample(index: int, seed: int):
    task = sinusoid_task(0, shots=10, seed=seed)
    return task.support, task.query


class HandWritten:
    """The peer baseline: MAML by plain autograd, Adam on theta_0."""

    def __init__(self, steps: int, batch: int):
        self.theta0 = {n: p.clone().requires_grad_() for n, p in model_params().items()}
        self.optimizer = torch.optim.Adam(self.theta0.values(), lr=OUTER_LR)
        self.steps, self.batch, self.step_index = steps, batch, 0

    def gradient(self, step: int) -> list[torch.Tensor]:
        total = [torch.zeros_like(v) for v in self.theta0.values()]
        for i in range(self.batch):
            support, query = sample(*meta_task(SEED, step, self.batch, i))
            theta = dict(self.theta0)
            for _ in range(self.steps):
                grads = torch.autograd.grad(mse(theta, None, support), list(theta.values()),
                                            create_graph=True)
                theta = {n: v - LR * g for (n, v), g in zip(theta.items(), grads, strict=True)}
            grads = torch.autograd.grad(mse(theta, None, query), list(self.theta0.values()))
            total = [t + g / self.batch for t, g in zip(total, grads, strict=True)]
        return total

    def step(self) -> None:
        for leaf, g in zip(self.theta0.values(), self.gradient(self.step_index), strict=True):
            leaf.grad = g
        self.optimizer.step()
        self.step_index += 1


def meta_loop(method: hd.methods.Method, steps: int, batch: int, imaml: bool = False):
    params = model_params()
    support, query = sample(0, 1)
    problem = hd.make_problem(imaml_loss if imaml else mse, mse,
                              hd.HyperParameters(theta0=hd.initialization(params)), params,
                              optimizer=hd.sgd(LR), train_data=support, val_data=query,
                              steps=steps)
    return hd.HyperOptimizer(problem, plan=hd.plans.MetaPlan(sample, batch=batch),
                             method=method, lr=OUTER_LR, schedule="constant", seed=SEED,
                             stopping=hd.Stopping(max_steps=10**6, patience=None))


def runners(steps: int, batch: int) -> dict[str, object]:
    """Each row's object with a ``step()``, fresh."""
    return {
        "hand-written MAML": HandWritten(steps, batch),
        "hyperdiff reverse": meta_loop(hd.reverse(), steps, batch),
        "hyperdiff checkpointed": meta_loop(hd.checkpointed(), steps, batch),
        "hyperdiff fomaml": meta_loop(hd.methods.fomaml(), steps, batch),
        "hyperdiff reptile": meta_loop(hd.methods.reptile(), steps, batch),
        "hyperdiff iMAML (implicit cg)": meta_loop(hd.implicit("cg"), steps, batch, imaml=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--long-steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/meta.json")
    args = parser.parse_args()
    # iMAML after a few steps is not at a stationary point, and its warnings say so every
    # step; this script measures its cost, not its bias (docs/meta.md)
    warnings.filterwarnings("ignore", category=hd.solvers.ConvergenceWarning)
    hand = HandWritten(args.steps, args.batch)
    loop = meta_loop(hd.reverse(), args.steps, args.batch)
    exact = loop.plan.evaluate(loop, 0, loop.raw).grad["theta0"]
    written = torch.cat([g.reshape(-1) for g in hand.gradient(0)]).double()
    max_diff = float((exact - written).abs().max())
    runs = runners(args.steps, args.batch)
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name].step()  # type: ignore[attr-defined]
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    memory = {}
    for steps in (args.steps, args.long_steps):
        for name, runner in runners(steps, args.batch).items():
            runner.step()  # type: ignore[attr-defined]  # warm up
            memory[(name, steps)] = peak_memory(runner.step)[1]  # type: ignore[attr-defined]
    base, base_cpu = min(times["hand-written MAML"]), min(cpu["hand-written MAML"])
    rows = [{"run": name, "time_s": min(times[name]), "vs_hand_written": min(times[name]) / base,
             "cpu_s": min(cpu[name]), "cpu_vs_hand_written": min(cpu[name]) / base_cpu,
             "peak_bytes": memory[(name, args.steps)],
             "peak_bytes_long": memory[(name, args.long_steps)]} for name in runs]
    skipped = [f"{peer}: not installed, row skipped" for peer in ("higher", "torchopt")
               if importlib.util.find_spec(peer) is None]
    print(f"sinusoid 1-40-40-1, {args.batch} tasks x {args.steps} inner steps per meta-step, "
          f"best of {args.repeats} (float32, 1 thread); hyperdiff reverse vs hand-written "
          f"meta-gradient: max |diff| {max_diff:.2e}")
    print(f"{'run':<32}{'wall ms':>9}{'x hand':>8}{'CPU ms':>9}{'x hand':>8}"
          f"{'peak KiB':>10}{f'@{args.long_steps} steps':>14}")
    for row in rows:
        print(f"{row['run']:<32}{1e3 * row['time_s']:>9.1f}{row['vs_hand_written']:>8.2f}"
              f"{1e3 * row['cpu_s']:>9.1f}{row['cpu_vs_hand_written']:>8.2f}"
              f"{row['peak_bytes'] / 1024:>10.0f}{row['peak_bytes_long'] / 1024:>14.0f}")
    for note in skipped:
        print(note)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "long_steps": args.long_steps,
                               "batch": args.batch, "repeats": args.repeats,
                               "max_abs_diff_reverse_vs_hand_written": max_diff,
                               "skipped": skipped, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
