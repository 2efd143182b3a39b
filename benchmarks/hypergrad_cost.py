"""Cost of one hypergradient: reverse and forward mode against plain training.

MLP 64-128-10 (tanh) on scikit-learn's digits, SGD with momentum 0.9, minibatches of 100,
k hyperparameters = L2 penalties on the first layer's hidden units in k groups (unit j belongs
to group j mod k). For T in {10, 100, 1000} and k in {1, 10, 100}, each measurement runs in a
fresh process (time: best of a few runs; memory: peak RSS growth over the RSS before the run),
and is reported as a ratio to plain training for T steps (a torch.optim loop over an
nn.Module, and hyperdiff's own non-differentiable training), timed in the same process,
interleaved with the method's runs (best of up to 5 rounds).
Workers run with one thread and a fixed glibc mmap threshold (see ``benchmarks/common.py``;
``--default-malloc`` keeps glibc's adaptive one). Peak-memory ratios are to hd.testing.train's peak
(at least 0.5 MB, since plain training's RSS growth is near zero).

It also reports the float32 hypergradient's relative error against float64 on the same problem
(SGD with momentum and Adam, T=200, learning rate and per-tensor weight decay).

    python benchmarks/hypergrad_cost.py            # full table (~10 min on 2 cores)
    python benchmarks/hypergrad_cost.py --quick    # T in {10, 100}, k in {1, 10}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    FIXED_MMAP_THRESHOLD,
    cross_entropy_losses,
    digits,
    in_subprocess,
    measure,
    mlp_params,
)

import hyperdiff as hd

HERE = Path(__file__).resolve()
BATCH = 100


def grouped_l2(k: int):
    def l2_of(p, h):
        groups = torch.arange(p["0.weight"].shape[0]) % k
        per_unit = h["l2"][groups]  # (hidden,)
        return 0.5 * (per_unit[:, None] * p["0.weight"] ** 2).sum()

    return l2_of


def cost_problem(steps: int, k: int, dtype=torch.float32) -> hd.Problem:
    x, y, xv, yv = digits(dtype)
    train_loss, val_loss = cross_entropy_losses(grouped_l2(k))
    hp = hd.HyperParameters(l2=hd.per_feature(1e-3, size=k))
    return hd.make_problem(
        train_loss, val_loss, hp, mlp_params(dtype), optimizer=hd.sgd(0.1, 0.9),
        train_data=hd.minibatches(x, y, batch_size=BATCH), val_data=(xv, yv), steps=steps,
    )


def torch_training(steps: int):
    """The baseline a user would write: nn.Module + torch.optim on the same batches."""
    x, y, _, _ = digits()
    source = hd.minibatches(x, y, batch_size=BATCH)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    l2 = 1e-3

    def run():
        for step in range(steps):
            xb, yb = source.batch(step, 0)
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb) + 0.5 * l2 * (model[0].weight ** 2).sum()
            loss.backward()
            opt.step()

    return run


def _best_time(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def worker(kind: str, steps: int, k: int) -> dict:
    """Peak memory of one run of ``kind`` in this fresh process, then its time interleaved
    with the two plain-training baselines in the same process (so load changes hit all)."""
    problem = cost_problem(steps, k)
    small = problem.with_steps(2)
    method = {"reverse": hd.reverse(), "forward": hd.forward()}.get(kind)

    def run():
        return hd.testing.train(problem) if method is None else method(problem)

    (hd.testing.train(small) if method is None else method(small))  # warm-up: first-call overheads
    result = measure(run, 1)
    if kind == "train":
        return result
    torch_run, hd_run = torch_training(steps), (lambda: hd.testing.train(problem))
    torch_training(2)()
    rounds = max(1, min(5, 300 // (steps * (k if kind == "forward" else 1))))
    times = {"method": [result["time_s"]], "torch": [], "hd": []}
    for _ in range(rounds):
        times["torch"].append(_best_time(torch_run, 1))
        times["hd"].append(_best_time(hd_run, 1))
        if len(times["method"]) < rounds:
            times["method"].append(_best_time(run, 1))
    times["torch"].append(_best_time(torch_run, 1))
    best = {key: min(v) for key, v in times.items()}
    return {
        "time_s": best["method"], "peak_mb": result["peak_mb"],
        "torch_train_time_s": best["torch"], "hd_train_time_s": best["hd"], "rounds": rounds,
    }


def float32_error() -> list[dict]:
    rows = []
    for name in ("sgd_momentum", "adam"):
        grads = {}
        for dtype in (torch.float32, torch.float64):
            x, y, xv, yv = digits(dtype)
            params = mlp_params(dtype)
            hp = hd.HyperParameters(
                lr=hd.scalar(0.1 if name == "sgd_momentum" else 0.01),
                wd=hd.per_tensor(params, 1e-3),
            )

            def l2_of(p, h):
                return 0.5 * sum(h.at("wd", param=n) * (v**2).sum() for n, v in p.items())

            train_loss, val_loss = cross_entropy_losses(l2_of)
            opt = hd.sgd("lr", 0.9) if name == "sgd_momentum" else hd.adam("lr")
            problem = hd.make_problem(
                train_loss, val_loss, hp, params, optimizer=opt, train_data=(x, y),
                val_data=(xv, yv), steps=200,
            )
            grads[dtype] = hd.reverse()(problem).vector.double()
        ref = grads[torch.float64]
        err = float((grads[torch.float32] - ref).norm() / ref.norm())
        rows.append({"optimizer": name, "steps": 200, "rel_error_float32": err})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's adaptive mmap threshold (RSS then also counts "
                        "allocator fragmentation, which grows with T in forward mode)")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "T", "K"))
    parser.add_argument("--out", default=str(HERE.parent / "results" / "hypergrad_cost.json"))
    args = parser.parse_args()
    if args.worker:
        kind, steps, k = args.worker
        print(json.dumps(worker(kind, int(steps), int(k))))
        return

    steps_grid = [10, 100] if args.quick else [10, 100, 1000]
    k_grid = [1, 10] if args.quick else [1, 10, 100]
    rows = []
    print(f"{'T':>5} {'k':>4} {'method':>8} {'time s':>9} {'x torch':>8} {'x hd.testing.train':>10} "
          f"{'peak MB':>9} {'x train':>8}")
    env = {} if args.default_malloc else FIXED_MMAP_THRESHOLD
    for steps in steps_grid:
        base_hd = in_subprocess(str(HERE), "train", str(steps), "1", env_extra=env)
        for k in k_grid:
            for kind in ("reverse", "forward"):
                m = in_subprocess(str(HERE), kind, str(steps), str(k), env_extra=env)
                row = {
                    "steps": steps, "k": k, "method": kind, **m,
                    "time_vs_torch_train": m["time_s"] / m["torch_train_time_s"],
                    "time_vs_hd_train": m["time_s"] / m["hd_train_time_s"],
                    "peak_mb_hd_train": base_hd["peak_mb"],
                }
                rows.append(row)
                mem_ratio = m["peak_mb"] / max(base_hd["peak_mb"], 0.5)
                print(f"{steps:>5} {k:>4} {kind:>8} {m['time_s']:>9.3f} "
                      f"{row['time_vs_torch_train']:>8.2f} {row['time_vs_hd_train']:>10.2f} "
                      f"{m['peak_mb']:>9.1f} {mem_ratio:>8.1f}", flush=True)

    print("\nforward-mode peak memory across T (target: flat within 10%)")
    for k in k_grid:
        mems = [r["peak_mb"] for r in rows if r["method"] == "forward" and r["k"] == k]
        print(f"  k={k:>3}: " + ", ".join(f"T={t}: {m:.1f} MB" for t, m in zip(steps_grid, mems, strict=True))
              + f"  (max/min {max(mems) / max(min(mems), 1e-9):.2f})")

    print("\nfloat32 hypergradient vs float64 (reverse, T=200; target <= 2e-3)")
    errors = float32_error()
    for e in errors:
        print(f"  {e['optimizer']:>13}: relative error {e['rel_error_float32']:.2e}")

    result = {
        "benchmark": "hypergrad_cost", "torch": torch.__version__, "hyperdiff": hd.__version__,
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "malloc": "glibc default" if args.default_malloc else FIXED_MMAP_THRESHOLD,
        "loadavg": os.getloadavg(), "rows": rows, "float32_error": errors,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
