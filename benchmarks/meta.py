"""MAML on the sinusoid tasks: what a meta-step costs against higher and TorchOpt, and the
post-adaptation MSE of MAML, first-order MAML, Meta-SGD and iMAML against the baselines.

**Cost** (``--steps``, default 1 and 5 inner steps). The sinusoid tasks of Finn et al. 2017
(``hyperdiff.app.tasks.few_shot.sinusoid_task``, 10 shots, 10 queries), the 1-40-40-1 ReLU
model (1761 parameters, ``torch.nn.Sequential`` of ``Linear`` layers, float32), inner SGD at lr
0.01, a meta-batch of ``--batch`` (25) tasks, Adam (lr 1e-3) on theta_0. Every row draws the
same tasks (``seeds.meta_task``) in the same process, interleaved over ``--repeats`` rounds in
rotated order (best of n, wall and CPU time of this single-threaded process):

- ``hand-written MAML``: plain autograd over an explicitly written SGD loop per task
  (``create_graph=True``), the query losses' gradients averaged, one Adam step;
- ``higher``: its MAML example's formulation, ``higher.innerloop_ctx(net, torch.optim.SGD)``
  per task, ``diffopt.step(loss)``, the query loss backpropagated into ``net``'s gradients;
- ``TorchOpt MetaSGD``: its MAML example's formulation, ``torchopt.MetaSGD(net)`` stepping the
  module in place, ``extract_state_dict`` / ``recover_state_dict`` between tasks;
- ``TorchOpt functional``: ``torchopt.sgd`` with ``update(..., inplace=False)`` and
  ``apply_updates(..., inplace=False)`` on the parameter tuple (its functional API);
- ``hyperdiff <method>``: one ``HyperOptimizer.step()`` with ``hd.plans.MetaPlan`` (records,
  guard and checks included): exact MAML by ``reverse`` (its batched form: the meta-batch as one
  vmapped computation, ``hyperdiff.engine.task_batch``; and ``reverse, per task``, the same
  method one task at a time), ``checkpointed``, ``forward`` (one tangent per parameter: 1761),
  first-order MAML, Reptile, and iMAML (``implicit`` with CG on the proximal problem,
  strength 2).

Each peer's meta-gradient is compared with the hand-written one (max abs difference, float32).
Peak memory is torch's own CPU allocations during one step (``hd.diagnose.peak_memory``); for
iMAML, forward mode and reverse it is also measured at ``--memory-steps`` inner steps (5 and
100) with ``--memory-batch`` tasks: iMAML and forward mode stay flat, reverse grows.

**Post-adaptation MSE** (``--eval-steps`` meta-steps, 5 and 10 shots, ``--seeds`` seeds): the
built-in ``sinusoid_maml`` task built as ``hyperdiff run`` builds it (``app.plans.build_meta``,
meta mode, without a run directory), meta batch 25, 5 inner SGD steps at lr 0.01, Adam 3e-3 on theta_0); its report's held-out tasks
(``hyperdiff.app.meta_report``) give the query MSE after the same 5-step adaptation from the
random initialization (the random-init baseline), from the learned theta_0, and from theta_0
pre-trained on the pooled data of the tasks meta-training drew (the pre-training baseline).
Variants: MAML (``reverse``), first-order MAML (``fomaml``), Meta-SGD (per-tensor learning
rates, ``task.params.meta_sgd``), iMAML (``implicit``, the proximal term in the training loss,
``task.params.proximal``; its CG solves run task by task, about 15 ms each, so its rows use a
meta-batch of ``--imaml-batch`` (5) tasks and ``--imaml-seeds`` (1) seed to fit the budget).

    OMP_NUM_THREADS=1 python benchmarks/meta.py            # both parts
    OMP_NUM_THREADS=1 python benchmarks/meta.py --quick    # a smoke run

Writes benchmarks/results/meta.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import hyperdiff as hd
from hyperdiff.app.config import load_config
from hyperdiff.app.meta_report import held_out_report, pretrained_start
from hyperdiff.app.plans import build_meta
from hyperdiff.app.tasks.few_shot import sinusoid_task
from hyperdiff.diagnose.check import peak_memory
from hyperdiff.hparams.initialization import proximal
from hyperdiff.seeds import meta_task
from hyperdiff.tuner.distributed.spread import LocalSpreader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from initialization import model_params, net  # the same model and forward

LR, OUTER_LR, STRENGTH, SEED = 0.01, 1e-3, 2.0, 0
PEERS = ("higher", "torchopt")
SLOW, SLOW_ROUNDS = {"hyperdiff forward"}, 2  # seconds per step: timed in 2 rounds only


def mse(p, h, batch) -> torch.Tensor:
    return ((net(p, batch[0]) - batch[1]) ** 2).mean()


def imaml_loss(p, h, batch) -> torch.Tensor:
    return mse(p, h, batch) + proximal(p, h, "theta0", STRENGTH)


def sample(index: int, seed: int):
    task = sinusoid_task(0, shots=10, seed=seed)
    return task.support, task.query


def step_tasks(step: int, batch: int):
    return [sample(*meta_task(SEED, step, batch, i)) for i in range(batch)]


def module() -> torch.nn.Module:
    """The 1-40-40-1 ReLU model as a module, with ``model_params()``'s values."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                               torch.nn.ReLU(), torch.nn.Linear(40, 1))


class HandWritten:
    """The peer baseline: MAML by plain autograd, Adam on theta_0."""

    def __init__(self, steps: int, batch: int):
        self.theta0 = {n: p.clone().requires_grad_() for n, p in model_params().items()}
        self.optimizer = torch.optim.Adam(self.theta0.values(), lr=OUTER_LR)
        self.steps, self.batch, self.step_index = steps, batch, 0

    def gradient(self, step: int) -> list[torch.Tensor]:
        total = [torch.zeros_like(v) for v in self.theta0.values()]
        for support, query in step_tasks(step, self.batch):
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


class HandWrittenVmapped(HandWritten):
    """The same MAML step written with ``torch.func``: one task's adaptation with
    ``torch.func.grad`` inside, ``torch.func.vmap`` over the stacked tasks, and autograd from
    the mean query loss to theta_0 (what a user of torch.func can write by hand)."""

    def gradient(self, step: int) -> list[torch.Tensor]:
        tasks = step_tasks(step, self.batch)
        data = [torch.stack([part[k] for part in parts]) for parts in zip(*tasks, strict=True)
                for k in (0, 1)]

        def task_loss(theta0, xs, ys, xq, yq):
            theta = theta0
            for _ in range(self.steps):
                grads = torch.func.grad(lambda p: mse(p, None, (xs, ys)))(theta)
                theta = {n: theta[n] - LR * grads[n] for n in theta}
            return mse(theta, None, (xq, yq))

        losses = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(self.theta0, *data)
        return list(torch.autograd.grad(losses.mean(), list(self.theta0.values())))


class ModulePeer:
    """A peer that trains ``torch.nn`` modules: its MAML step accumulates the query losses'
    gradients (divided by the batch) into ``net``'s ``.grad``, then one Adam step."""

    def __init__(self, steps: int, batch: int):
        self.net = module()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=OUTER_LR)
        self.steps, self.batch, self.step_index = steps, batch, 0

    def gradient(self, step: int) -> list[torch.Tensor]:
        self.optimizer.zero_grad()
        self.accumulate(step_tasks(step, self.batch))
        return [p.grad.clone() for p in self.net.parameters()]

    def accumulate(self, tasks) -> None:
        raise NotImplementedError

    def step(self) -> None:
        self.gradient(self.step_index)
        self.optimizer.step()
        self.step_index += 1


def query_mse(out: torch.Tensor, query) -> torch.Tensor:
    return ((out - query[1]) ** 2).mean()


class Higher(ModulePeer):
    """higher's MAML example: ``innerloop_ctx`` with ``torch.optim.SGD``, a loop over tasks."""

    def __init__(self, steps: int, batch: int):
        super().__init__(steps, batch)
        self.inner = torch.optim.SGD(self.net.parameters(), lr=LR)

    def accumulate(self, tasks) -> None:
        import higher

        for support, query in tasks:
            with higher.innerloop_ctx(self.net, self.inner, copy_initial_weights=False) as (
                    fnet, diffopt):
                for _ in range(self.steps):
                    diffopt.step(query_mse(fnet(support[0]), support))
                (query_mse(fnet(query[0]), query) / self.batch).backward()


class TorchOptMeta(ModulePeer):
    """TorchOpt's MAML example: ``torchopt.MetaSGD`` steps the module in place; its state is
    extracted before the tasks and recovered after each."""

    def __init__(self, steps: int, batch: int):
        super().__init__(steps, batch)
        import torchopt

        self.inner = torchopt.MetaSGD(self.net, lr=LR)

    def accumulate(self, tasks) -> None:
        import torchopt

        net_state = torchopt.extract_state_dict(self.net, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(self.inner, by="reference")
        for support, query in tasks:
            for _ in range(self.steps):
                self.inner.step(query_mse(self.net(support[0]), support))
            (query_mse(self.net(query[0]), query) / self.batch).backward()
            torchopt.recover_state_dict(self.net, net_state)
            torchopt.recover_state_dict(self.inner, opt_state)


class TorchOptFunctional(ModulePeer):
    """TorchOpt's functional API: ``torchopt.sgd`` on the parameter tuple, ``inplace=False``."""

    def accumulate(self, tasks) -> None:
        import torchopt

        names = [n for n, _ in self.net.named_parameters()]
        theta0 = tuple(self.net.parameters())
        inner = torchopt.sgd(lr=LR)
        for support, query in tasks:
            params, state = theta0, inner.init(theta0)
            for _ in range(self.steps):
                loss = mse(dict(zip(names, params, strict=True)), None, support)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                updates, state = inner.update(grads, state, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
            (mse(dict(zip(names, params, strict=True)), None, query) / self.batch).backward()


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


def per_task(method: hd.methods.Method) -> hd.methods.Method:
    """``method`` without its batched form: the meta-batch's tasks one at a time."""
    return dataclasses.replace(method, batch_fn=None)


PEER_ROWS = {"hand-written MAML": HandWritten,
             "hand-written MAML, torch.func vmap": HandWrittenVmapped, "higher": Higher,
             "TorchOpt MetaSGD": TorchOptMeta, "TorchOpt functional": TorchOptFunctional}
PEER_MODULE = {"higher": "higher", "TorchOpt MetaSGD": "torchopt",
               "TorchOpt functional": "torchopt"}


def hyperdiff_rows(steps: int, batch: int, forward: bool = True) -> dict[str, object]:
    rows = {
        "hyperdiff reverse (batched)": meta_loop(hd.reverse(), steps, batch),
        "hyperdiff reverse, per task": meta_loop(per_task(hd.reverse()), steps, batch),
        "hyperdiff checkpointed": meta_loop(hd.checkpointed(), steps, batch),
        "hyperdiff forward": meta_loop(hd.forward(), steps, batch),
        "hyperdiff fomaml": meta_loop(hd.methods.fomaml(), steps, batch),
        "hyperdiff reptile": meta_loop(hd.methods.reptile(), steps, batch),
        "hyperdiff iMAML (implicit cg)": meta_loop(hd.implicit("cg"), steps, batch, imaml=True),
    }
    if not forward:
        del rows["hyperdiff forward"]
    return rows


def runners(steps: int, batch: int, forward: bool) -> dict[str, object]:
    """Each row's object with a ``step()``, fresh (peers that are not installed left out)."""
    peers = {name: cls(steps, batch) for name, cls in PEER_ROWS.items()
             if importlib.util.find_spec(PEER_MODULE.get(name, "torch")) is not None}
    return {**peers, **hyperdiff_rows(steps, batch, forward)}


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def gradient_check(steps: int, batch: int) -> dict[str, float]:
    """Max |meta-gradient - hand-written| at step 0 for every peer and hyperdiff reverse."""
    written = flat(HandWritten(steps, batch).gradient(0))
    diffs = {}
    for name, cls in PEER_ROWS.items():
        if name != "hand-written MAML" and importlib.util.find_spec(PEER_MODULE.get(name, "torch")):
            diffs[name] = float((flat(cls(steps, batch).gradient(0)) - written).abs().max())
    for name, method in (("hyperdiff reverse (batched)", hd.reverse()),
                         ("hyperdiff reverse, per task", per_task(hd.reverse()))):
        loop = meta_loop(method, steps, batch)
        grad = loop.plan.evaluate(loop, 0, loop.raw).grad["theta0"]
        diffs[name] = float((grad - written.double()).abs().max())
    return diffs


def time_rows(steps: int, batch: int, repeats: int, forward: bool) -> list[dict]:
    runs = runners(steps, batch, forward)
    for name, runner in runs.items():
        if name not in SLOW:
            runner.step()  # type: ignore[attr-defined]  # warm up (vmap's first call, allocator)
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            if name in SLOW and round_ >= SLOW_ROUNDS:
                continue
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name].step()  # type: ignore[attr-defined]
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    peers = [n for n in runs if n in PEER_MODULE]
    fastest = min(peers, key=lambda n: min(times[n])) if peers else "hand-written MAML"
    fastest_cpu = min(peers, key=lambda n: min(cpu[n])) if peers else "hand-written MAML"
    hand = "hand-written MAML"
    return [{"run": name, "steps": steps, "time_s": min(times[name]),
             "median_s": statistics.median(times[name]), "cpu_s": min(cpu[name]),
             "vs_fastest_peer": min(times[name]) / min(times[fastest]),
             "cpu_vs_fastest_peer": min(cpu[name]) / min(cpu[fastest_cpu]),
             "vs_hand_written": min(times[name]) / min(times[hand]),
             "fastest_peer": fastest} for name in runs]


def memory_rows(steps_list: list[int], batch: int) -> list[dict]:
    rows = []
    for steps in steps_list:
        runs = {"hand-written MAML": HandWritten(steps, batch),
                "hyperdiff reverse": meta_loop(hd.reverse(), steps, batch),
                "hyperdiff forward": meta_loop(hd.forward(), steps, batch),
                "hyperdiff iMAML (implicit cg)": meta_loop(hd.implicit("cg"), steps, batch,
                                                           imaml=True)}
        for name, runner in runs.items():
            if name not in SLOW:
                runner.step()  # type: ignore[attr-defined]  # warm up
            start = time.perf_counter()
            peak = peak_memory(runner.step)[1]  # type: ignore[attr-defined]
            rows.append({"run": name, "steps": steps, "batch": batch, "peak_bytes": peak,
                         "time_s": time.perf_counter() - start})
    return rows


def print_cost(rows: list[dict], diffs: dict[str, float], batch: int, repeats: int) -> None:
    print(f"\nsinusoid 1-40-40-1 ReLU, meta-batch {batch}, inner SGD lr {LR}, float32, "
          f"1 thread, best of {repeats}")
    print("meta-gradient vs hand-written, max |diff|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    print(f"{'run':<36}{'T':>3}{'wall ms':>9}{'x fastest peer':>16}{'CPU ms':>9}"
          f"{'x peer (CPU)':>14}{'x hand':>8}")
    for row in rows:
        print(f"{row['run']:<36}{row['steps']:>3}{1e3 * row['time_s']:>9.1f}"
              f"{row['vs_fastest_peer']:>16.2f}{1e3 * row['cpu_s']:>9.1f}"
              f"{row['cpu_vs_fastest_peer']:>14.2f}{row['vs_hand_written']:>8.2f}")


def print_memory(memory: list[dict]) -> None:
    print(f"\npeak memory of one meta-step (torch CPU allocations, {memory[0]['batch']} tasks)")
    for row in memory:
        print(f"{row['run']:<36}{row['steps']:>4} steps {row['peak_bytes'] / 1024:>10.0f} KiB")


# ------------------------------------------------------------------ post-adaptation MSE
VARIANTS = {
    "MAML": ["method.name=reverse"],
    "first-order MAML": ["method.name=fomaml"],
    "Meta-SGD": ["method.name=reverse", "task.params.meta_sgd=true"],
    "iMAML": ["method.name=implicit", f"task.params.proximal={STRENGTH}"],
}


def meta_run(variant: str, shots: int, seed: int, steps: int, batch: int, held_out: int
             ) -> dict:
    """One meta run of the built-in ``sinusoid_maml`` task as ``hyperdiff run`` builds it
    (``app.plans.build_meta``, without a run directory), and its report's held-out tasks
    (``app.meta_report``, as the run's summary calls it)."""
    config = load_config(None, [
        "task.name=sinusoid_maml", f"task.params.shots={shots}", f"stop.max_steps={steps}",
        f"outer.meta_batch={batch}", f"outer.meta_test_tasks={held_out}", f"outer.seed={seed}",
        "task.selection_fraction=0", *VARIANTS[variant]])
    task, loop = build_meta(config)
    start = time.perf_counter()
    result = loop.run(progress=False)
    loop_s = time.perf_counter() - start
    initial = task.hparams.raw
    pretrained = pretrained_start(task, initial, steps=loop.step_index, batch=batch, seed=seed,
                                  lr=config.outer.lr)
    assert pretrained is not None  # the task tunes theta_0
    report = held_out_report(task, {"random_init": initial, "learned": result.final_raw,
                                    "pretrained": pretrained}, held_out, LocalSpreader())
    return {"variant": variant, "shots": shots, "seed": seed, "meta_steps": loop.step_index,
            "meta_batch": batch,
            "outer_loop_s": loop_s, "wall_s": time.perf_counter() - start,
            **{label: report[label]["query_loss"] for label in report},
            **{f"{label}_task_std": report[label]["query_loss_std"] for label in report}}


def summarize(runs: list[dict]) -> list[dict]:
    table = []
    for variant in VARIANTS:
        for shots in sorted({r["shots"] for r in runs}):
            group = [r for r in runs if r["variant"] == variant and r["shots"] == shots]
            if not group:
                continue
            row: dict = {"variant": variant, "shots": shots, "seeds": len(group),
                         "meta_batch": group[0]["meta_batch"]}
            for key in ("learned", "random_init", "pretrained", "outer_loop_s"):
                values = [r[key] for r in group]
                row[key] = statistics.fmean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row["pretrained_over_learned"] = row["pretrained"] / row["learned"]
            table.append(row)
    return table


def print_eval(table: list[dict], steps: int, batch: int, held_out: int) -> None:
    print(f"\npost-adaptation query MSE on {held_out} held-out tasks (5 SGD steps, lr {LR}), "
          f"{steps} meta-steps, mean +- std over seeds")
    print(f"{'variant':<18}{'batch':>6}{'seeds':>6}{'shots':>6}{'learned':>16}{'random init':>16}{'pre-trained':>16}"
          f"{'pre/learned':>12}{'loop s':>8}")
    for r in table:
        print(f"{r['variant']:<18}{r['meta_batch']:>6}{r['seeds']:>6}{r['shots']:>6}"
              f"{r['learned']:>9.3f} +-{r['learned_std']:<5.2f}"
              f"{r['random_init']:>9.3f} +-{r['random_init_std']:<5.2f}"
              f"{r['pretrained']:>9.3f} +-{r['pretrained_std']:<5.2f}"
              f"{r['pretrained_over_learned']:>12.2f}{r['outer_loop_s']:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-steps", type=int, nargs="+", default=[5, 100])
    parser.add_argument("--memory-batch", type=int, default=1)
    parser.add_argument("--eval-steps", type=int, default=300)
    parser.add_argument("--eval-shots", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--imaml-batch", type=int, default=5,
                        help="iMAML's meta-batch in the MSE table (its CG solves are per task)")
    parser.add_argument("--imaml-seeds", type=int, default=1)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run (few steps, 1 seed)")
    parser.add_argument("--out", default="benchmarks/results/meta.json")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.memory_steps, args.eval_steps = 2, [5, 20], 20
        args.seeds, args.held_out, args.imaml_batch = 1, 20, 2
    torch.set_num_threads(1)
    # iMAML after a few steps is not at a stationary point, and its warnings say so every
    # step; this script measures its cost, not its bias (docs/meta.md)
    warnings.filterwarnings("ignore", category=hd.solvers.ConvergenceWarning)
    started = time.perf_counter()
    out: dict = {"batch": args.batch, "inner_lr": LR, "repeats": args.repeats,
                 "versions": {"torch": torch.__version__}}
    for peer in PEERS:
        if importlib.util.find_spec(peer) is not None:
            out["versions"][peer] = importlib.metadata.version(peer)
    out["skipped"] = [f"{peer}: not installed, its rows skipped" for peer in PEERS
                      if importlib.util.find_spec(peer) is None]
    if not args.skip_cost:
        diffs = {steps: gradient_check(steps, args.batch) for steps in args.steps}
        rows = [row for steps in args.steps
                for row in time_rows(steps, args.batch, args.repeats, forward=steps <= 1)]
        memory = memory_rows(args.memory_steps, args.memory_batch)
        for steps in args.steps:
            print_cost([r for r in rows if r["steps"] == steps], diffs[steps], args.batch,
                       args.repeats)
        print_memory(memory)
        out |= {"max_abs_diff_vs_hand_written": {str(k): v for k, v in diffs.items()},
                "rows": rows, "memory": memory, "cost_s": time.perf_counter() - started}
        for note in out["skipped"]:
            print(note)
    if not args.skip_eval:
        eval_started = time.perf_counter()
        runs = [meta_run(variant, shots, seed, args.eval_steps,
                         args.imaml_batch if variant == "iMAML" else args.batch, args.held_out)
                for shots in args.eval_shots for variant in VARIANTS
                for seed in range(args.imaml_seeds if variant == "iMAML" else args.seeds)]
        table = summarize(runs)
        print_eval(table, args.eval_steps, args.batch, args.held_out)
        out |= {"eval_meta_steps": args.eval_steps, "eval_held_out_tasks": args.held_out,
                "eval_runs": runs, "eval": table, "eval_s": time.perf_counter() - eval_started}
    out["total_s"] = time.perf_counter() - started
    print(f"\ntotal {out['total_s']:.0f} s")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
