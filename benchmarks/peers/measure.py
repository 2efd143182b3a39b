"""Time and peak-memory benchmark of the peer hypergradients, one fresh subprocess per cell.

Usage (from the repo root):
  python -m benchmarks.peers.measure                       # sgd, T=50, all peers, float32
  python -m benchmarks.peers.measure --optimizer sgd adam --steps 10 50 200

Each cell (peer, optimizer, T) runs in its own ``python -m benchmarks.peers.measure --worker``
process, which:
  1. imports torch + the peer, builds the float32 problem, and runs a T=1 warm-up call (lazy
     imports, allocator, Betty's functorch patching, ...);
  2. records the current RSS (``VmRSS`` from /proc/self/status) as the baseline;
  3. runs the T-step hypergradient once and reads the process peak RSS
     (``resource.getrusage(RUSAGE_SELF).ru_maxrss``); ``peak_MiB = ru_maxrss - baseline`` is the
     extra resident memory needed by the T-step call (tape + optimizer state + transients);
  4. repeats the call ``--repeats`` more times (default 2) for timing; min and median wall
     time of all timed calls are printed, plus the min process CPU time (``cpu s``,
     ``time.process_time``), which is the least disturbed by other load on a shared machine.
Timing uses ``torch.set_num_threads(1)`` by default (``--threads``).

Why RSS: ``tracemalloc`` does not see torch's C++ allocations, and the CPU allocator profiler
(``torch.profiler.profile(profile_memory=True)``) reports per-op allocation events, not a
process-wide peak, and slows the run. ``ru_maxrss`` is a high-water mark of the whole process,
so a fresh process per cell is needed; the T=1 warm-up keeps the baseline's own peak small.
RSS includes glibc malloc caching/fragmentation and non-tensor objects, so it is an upper bound
on the live tensor memory, not an exact count of bytes. ``--tape`` adds a malloc-independent
cross-check: the MiB of distinct storages autograd saved (``saved_tensors_hooks``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # allow `python benchmarks/peers/measure.py`
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.peers"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS = ("reference", "torchopt", "higher", "betty")


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def saved_tensor_mib(fn, *args) -> float:
    """MiB of distinct tensor storages autograd saved while running ``fn(*args)``.

    Cross-check of the RSS number that does not depend on malloc: every tensor the tape saves
    (forward graph and the create_graph=True double-backward graph) goes through the pack hook;
    storages are de-duplicated by address (saved storages stay alive until the final backward,
    so an address cannot be reused by another saved tensor in between).
    """
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except Exception:  # sparse/meta tensors have no plain storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values()) / 2**20


def worker(
    peer: str,
    optimizer: str,
    steps: int,
    dtype_name: str,
    repeats: int,
    threads: int | None,
    tape: bool = False,
) -> dict:
    import gc
    import importlib
    import resource
    import warnings

    warnings.simplefilter("ignore")
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .common import digits_problem, init_params, initial_hyperparameters

    mod_name = "reference" if peer == "reference" else f"{peer}_impl"
    mod = importlib.import_module(f"benchmarks.peers.{mod_name}")
    out = {
        "peer": peer,
        "optimizer": optimizer,
        "steps": steps,
        "dtype": dtype_name,
        "threads": torch.get_num_threads(),
        "version": getattr(mod, "VERSION", None),
    }
    if not mod.AVAILABLE:
        out["error"] = f"unavailable: {mod.REASON}"
        return out
    dtype = getattr(torch, dtype_name)
    prob = digits_problem(dtype)
    p0 = init_params(dtype)
    llr, lwd = initial_hyperparameters(optimizer, dtype)
    try:
        mod.hypergradient(prob, p0, llr, lwd, optimizer, 1)  # warm-up
        gc.collect()
        base = _rss_kib()
        times, cpu_times = [], []
        c0, t0 = time.process_time(), time.perf_counter()
        val, g_lr, g_wd = mod.hypergradient(prob, p0, llr, lwd, optimizer, steps)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        for _ in range(repeats):
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            mod.hypergradient(prob, p0, llr, lwd, optimizer, steps)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        if tape:
            out["tape_MiB"] = saved_tensor_mib(
                mod.hypergradient, prob, p0, llr, lwd, optimizer, steps
            )
    except Exception as exc:  # report, do not hide
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    times.sort()
    out.update(
        time_median_s=times[len(times) // 2],
        time_min_s=times[0],
        n_timed=len(times),
        cpu_min_s=min(cpu_times),
        peak_delta_MiB=(peak - base) / 1024.0,
        baseline_rss_MiB=base / 1024.0,
        val=val,
        g_lr=float(g_lr),
        finite=bool(torch.isfinite(g_wd).all() and torch.isfinite(g_lr).all()),
    )
    return out


def run_cell(peer, optimizer, steps, dtype, repeats, threads, timeout, tape=False) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.peers.measure",
        "--worker",
        peer,
        "--optimizer",
        optimizer,
        "--steps",
        str(steps),
        "--dtype",
        dtype,
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
    ] + (["--tape"] if tape else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {
            "peer": peer,
            "optimizer": optimizer,
            "steps": steps,
            "error": f"timeout after {timeout}s",
        }
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {
        "peer": peer,
        "optimizer": optimizer,
        "steps": steps,
        "error": f"rc={proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="peer hypergradient timing / peak-RSS table")
    ap.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    ap.add_argument("--optimizer", nargs="+", choices=("sgd", "adam"), default=["sgd"])
    ap.add_argument("--steps", nargs="+", type=int, default=[50])
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=2, help="extra timed calls after the first")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: with 2 threads on a shared 2-core "
        "machine the OpenMP spin-waits made timings vary 10x); 0 = torch default",
    )
    ap.add_argument("--timeout", type=int, default=240, help="seconds per cell")
    ap.add_argument(
        "--tape",
        action="store_true",
        help="also report MiB of tensors saved by autograd (one extra call per row)",
    )
    ap.add_argument("--json", help="also write all rows to this JSON file")
    args = ap.parse_args(argv)

    if args.worker:
        res = worker(
            args.worker,
            args.optimizer[0],
            args.steps[0],
            args.dtype,
            args.repeats,
            args.threads,
            args.tape,
        )
        print(json.dumps(res))
        return 0

    rows = []
    hdr = (
        f"{'optimizer':<9} {'T':>4} {'peer':<10} {'min s':>8} {'median s':>9} {'cpu s':>7} "
        f"{'peak dRSS MiB':>13} {'val loss':>10} {'d/dlog_lr':>11}  note"
    )
    print(
        f"dtype={args.dtype}; one subprocess per row; T=1 warm-up; "
        f"{args.repeats + 1} timed calls per row"
    )
    print(hdr)
    print("-" * len(hdr))
    for opt in args.optimizer:
        for steps in args.steps:
            for peer in args.peers:
                r = run_cell(
                    peer,
                    opt,
                    steps,
                    args.dtype,
                    args.repeats,
                    args.threads,
                    args.timeout,
                    args.tape,
                )
                rows.append(r)
                if "error" in r:
                    print(
                        f"{opt:<9} {steps:>4} {peer:<10} {'-':>8} {'-':>9} {'-':>7} {'-':>13} "
                        f"{'-':>10} {'-':>11}  {r['error']}"
                    )
                else:
                    note = "" if r["finite"] else "non-finite hypergradient"
                    if "tape_MiB" in r:
                        note = f"tape {r['tape_MiB']:.1f} MiB " + note
                    print(
                        f"{opt:<9} {steps:>4} {peer:<10} {r['time_min_s']:>8.3f} "
                        f"{r['time_median_s']:>9.3f} {r['cpu_min_s']:>7.3f} "
                        f"{r['peak_delta_MiB']:>13.1f} "
                        f"{r['val']:>10.5f} {r['g_lr']:>11.4e}  {note}",
                        flush=True,
                    )
    if rows and "threads" in rows[0]:
        print(f"torch threads: {rows[0]['threads']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
