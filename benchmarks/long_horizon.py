"""Long horizons: time and peak memory of reverse, checkpointed, reversible and truncated mode.

MLP 64-128-10 (tanh, float32) on scikit-learn's digits, minibatches of 100, SGD with
momentum; hyperparameters: learning rate, momentum and an L2 penalty. For T in {100, 1000}
every method runs in a fresh process: after building the problem and a warm-up call at T=2
(imports, allocator, first-call overheads), the process's RSS is read from /proc/self/statm;
after the timed call, ``ru_maxrss`` (the lifetime peak RSS, from ``resource.getrusage``) minus
that baseline is the peak memory of the call. Peak RSS is what the operating system has to
provide, allocator caching and fragmentation included; because ``ru_maxrss`` is a lifetime
peak, one measurement per process is the only honest reading. Processes for the methods are
interleaved over several rounds (shared, noisy machine); within a process the call is repeated
up to 3 times when T < 1000. Time is the best call, memory the median over rounds. Ratios are
to full reverse mode measured in the same run. Also reported: the relative difference of each
hypergradient from reverse mode's (float32), and plain training (``hd.testing.train``, no
hypergradient) as the floor of time and memory in this harness.

Targets at T=1000: checkpointed peak memory <= 1/5 of reverse at <= 1.5x its time;
reversible peak memory <= 1/10 of reverse.

    python benchmarks/long_horizon.py              # T in {100, 1000}, 3 rounds (~5 min)
    python benchmarks/long_horizon.py --steps 100 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cross_entropy_losses, digits, in_subprocess, measure, mlp_params

import hyperdiff as hd
from hyperdiff.methods.checkpointed import checkpointed
from hyperdiff.methods.reversible import reversible
from hyperdiff.methods.truncated import truncated

HERE = Path(__file__).resolve()
BATCH = 100
METHODS = ("reverse", "checkpointed", "reversible", "truncated", "train")
TARGETS = {  # at T=1000: (peak memory ratio, time ratio) upper bounds
    "checkpointed": {"peak_ratio": 1 / 5, "time_ratio": 1.5},
    "reversible": {"peak_ratio": 1 / 10},
}


def problem(steps: int) -> hd.Problem:
    x, y, xv, yv = digits(torch.float32)
    train_loss, val_loss = cross_entropy_losses(
        lambda p, h: 0.5 * h["l2"] * sum((v**2).sum() for n, v in p.items() if "weight" in n)
    )
    hp = hd.HyperParameters(
        lr=hd.scalar(0.1), momentum=hd.scalar(0.9, (0.0, 1.0)), l2=hd.scalar(1e-3)
    )
    return hd.make_problem(
        train_loss, val_loss, hp, mlp_params(torch.float32),
        optimizer=hd.sgd("lr", "momentum"), train_data=hd.minibatches(x, y, batch_size=BATCH),
        val_data=(xv, yv), steps=steps,
    )


def make_method(name: str, steps: int) -> hd.methods.Method:
    """The method called ``name``; ``train`` is plain training (no hypergradient), the floor."""
    if name == "train":
        return hd.methods.Method("train", lambda problem, raw: _train_only(problem, raw))
    if name == "reverse":
        return hd.reverse()
    if name == "checkpointed":
        return checkpointed()
    if name == "reversible":
        return reversible()
    return truncated(max(1, steps // 10))


def _train_only(problem: hd.Problem, raw) -> hd.HyperGradient:
    state, losses = hd.testing.train(problem, raw)
    zeros = {n: torch.zeros_like(v) for n, v in raw.items()}
    return hd.HyperGradient(
        value=float("nan"), grad=zeros, grad_natural=zeros, method="train",
        hparams=problem.hparams, train_loss=float(losses[-1]), params=state.params,
        buffers=state.buffers,
    )


def worker(name: str, steps: int) -> dict:
    torch.set_num_threads(1)
    full = problem(steps)
    make_method(name, 2)(full.with_steps(2))  # warm-up
    method = make_method(name, steps)
    out = {}

    def run():
        out["result"] = method(full)

    m = measure(run, repeats=max(1, min(3, 300 // steps)))
    result = out["result"]
    keep = ("segments", "info_bytes", "info_bits_per_element", "k")
    return {
        **m, "method": repr(method), "value": result.value, "grad": result.vector.tolist(),
        **{k: v for k, v in result.diagnostics.items() if k in keep},
    }


def summarize(steps: int, runs: dict[str, list[dict]]) -> list[dict]:
    ref = runs["reverse"]
    ref_time = min(r["time_s"] for r in ref)
    ref_peak = statistics.median(r["peak_mb"] for r in ref)
    g_ref = torch.tensor(ref[0]["grad"], dtype=torch.float64)
    rows = []
    for name in METHODS:
        rs = runs[name]
        time_s, peak = min(r["time_s"] for r in rs), statistics.median(r["peak_mb"] for r in rs)
        g = torch.tensor(rs[0]["grad"], dtype=torch.float64)
        rel_diff = float((g - g_ref).norm() / g_ref.norm()) if name != "train" else None
        row = {
            "steps": steps, "method": rs[0]["method"], "time_s": time_s, "peak_mb": peak,
            "time_ratio": time_s / ref_time, "peak_ratio": peak / ref_peak,
            "rel_diff_vs_reverse": rel_diff,
            "times_s": [r["time_s"] for r in rs], "peaks_mb": [r["peak_mb"] for r in rs],
            **{k: rs[0][k] for k in ("segments", "info_bytes", "k") if k in rs[0]},
        }
        target = TARGETS.get(name) if steps == 1000 else None
        if target:
            row["targets"] = target
            row["meets_targets"] = all(row[k] <= v for k, v in target.items())
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "T"))
    parser.add_argument("--out", default=str(HERE.parent / "results" / "long_horizon.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return

    rows = []
    print(f"{'T':>5} {'method':<32} {'time s':>8} {'x rev':>6} {'peak MB':>9} {'x rev':>6} "
          f"{'rel diff':>9}  target")
    for steps in args.steps:
        runs: dict[str, list[dict]] = {name: [] for name in METHODS}
        for _ in range(args.rounds):
            for name in METHODS:
                runs[name].append(in_subprocess(str(HERE), name, str(steps)))
        for row in summarize(steps, runs):
            rows.append(row)
            rel_diff = row["rel_diff_vs_reverse"]
            verdict = ""
            if "targets" in row:
                verdict = ("met" if row["meets_targets"] else "MISSED") + " " + ", ".join(
                    f"{k}<={v:.2g}" for k, v in row["targets"].items()
                )
            diff = "-" if rel_diff is None else f"{rel_diff:.1e}"
            print(f"{steps:>5} {row['method']:<32} {row['time_s']:>8.2f} {row['time_ratio']:>6.2f} "
                  f"{row['peak_mb']:>9.1f} {row['peak_ratio']:>6.3f} {diff:>9}  {verdict}",
                  flush=True)

    result = {
        "benchmark": "long_horizon", "torch": torch.__version__, "hyperdiff": hd.__version__,
        "machine": platform.processor() or platform.machine(), "threads": 1,
        "model": "MLP 64-128-10 tanh, float32, digits, minibatches of 100, sgd(lr, momentum)",
        "memory": "peak RSS (ru_maxrss) minus RSS after setup and a T=2 warm-up, one "
                  "measurement per fresh process; median over rounds",
        "time": "wall time of one call, best over rounds and repeats", "rounds": args.rounds,
        "command": "python benchmarks/long_horizon.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
