"""hyperdiff against TorchOpt, higher and Betty: one hypergradient problem, one run.

Problem (``benchmarks/peers/common.py``, identical for every library): MLP 64-128-10 (tanh) on
scikit-learn's digits (rows 0-999 train, full batch; rows 1000-1399 validation), T steps of
SGD with momentum 0.9 (lr 0.1) or Adam (lr 0.01), hyperparameters ``log lr`` (scalar) and
``log wd`` (one weight decay per parameter tensor, 1e-3), inner loss
``CE + 0.5 * sum_k wd_k ||p_k||^2``, outer loss validation CE, hypergradient
``d L_val / d (log lr, log wd)`` by exact reverse mode in every library.

Each measurement is a fresh process (forked from a forkserver that has imported torch and the
libraries; 1 torch thread, OMP_NUM_THREADS=1): a T=4 warm-up, then N timed float32 calls; it
reports the best wall time, the best process CPU time and the peak RSS rise of the first call.
Every (optimizer, T, library) is measured in ``--rounds`` such processes, interleaved with the
other libraries, and the best of all is kept (the machine may be shared). Each float32
hypergradient is compared with a float64 reference (hyperdiff's reverse mode in float64, itself
cross-checked against the plain-autograd ``benchmarks/peers/reference.py``). Ratios are against
the fastest peer (time) and the peer with the least peak memory; ``ops/step`` (aten kernels per
inner step, forward + backward + reverse pass) is a noise-free measure of the work per step.

hyperdiff rows: exact reverse mode with the MLP as a plain function and through
``hd.functional(module)`` (the faster over the grid is the headline), the exact checkpointed
reverse mode (``ceil(sqrt(T))`` segments), and, for information, reverse mode with the weight
decay as the optimizer's differentiable ``weight_decay="wd"`` instead of the loss term (the same
hypergradient with fewer kernels; not how the peers are run, so not the headline).

    python benchmarks/peers.py           # T in {10, 50, 200}, SGD-momentum and Adam
    python benchmarks/peers.py --quick   # T in {10, 50}, SGD-momentum only

Writes ``benchmarks/results/peers.json``. Peers are optional: a peer that cannot be imported or
run on this torch is reported with the reason (see ``docs/peers.md`` for the pinned installs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hyperdiff as hd  # noqa: E402
from benchmarks.peers.common import (  # noqa: E402
    INIT_LR,
    INIT_WD,
    MOMENTUM,
    PARAM_NAMES,
    init_params,
    initial_hyperparameters,
    module_with_params,
)

PEERS = ("torchopt", "higher", "betty")
# library -> (label, kind); kinds: "peer" (in the ratios), "hyperdiff", "baseline"
LIBRARIES = {
    "hyperdiff-reverse": ("hyperdiff reverse (function)", "hyperdiff"),
    "hyperdiff-reverse-functional": ("hyperdiff reverse (hd.functional)", "hyperdiff"),
    "hyperdiff-checkpointed": ("hyperdiff checkpointed (function)", "hyperdiff"),
    "hyperdiff-reverse-optwd": ("hyperdiff reverse (wd in optimizer)", "hyperdiff"),
    "autograd": ("plain torch.autograd (reference.py)", "baseline"),
    "torchopt": ("TorchOpt", "peer"),
    "higher": ("higher", "peer"),
    "betty": ("Betty", "peer"),
}
REVERSE_VARIANTS = ("hyperdiff-reverse", "hyperdiff-reverse-functional")
# why a peer's Adam hypergradient differs from torch.optim.Adam's (see benchmarks/peers/NOTES.md)
ADAM_NOTES = {
    "torchopt": "Adam bias corrections in float32 (1-b^t from an int64 count)",
    "higher": "old torch Adam formula: eps not divided by sqrt(1-b2^t)",
    "betty": "Adam step counter starts at 1 (state init by a zero-grad step)",
}
# warm-up length: >= 2 checkpointed segments, so that every code path (and torch's lazy imports,
# e.g. sympy on the first autograd.grad with grad_outputs) runs before the measured calls
WARM_UP_STEPS = 4
GRAD_NAMES = ("log_lr", *(f"log_wd[{n}]" for n in PARAM_NAMES))


# ---- the problem, expressed through hyperdiff's public API --------------------------------


def mlp(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """64-128-10 tanh MLP as a plain function of a parameter dict (fc1.*, fc2.*)."""
    h = torch.tanh(torch.addmm(p["fc1.bias"], x, p["fc1.weight"].T))
    return torch.addmm(p["fc2.bias"], h, p["fc2.weight"].T)


def hyperdiff_problem(
    data: dict, optimizer: str, steps: int, dtype, model: str, wd_in_optimizer: bool = False
) -> hd.Problem:
    """The benchmark problem as an ``hd.Problem`` (``model``: "function" or "functional").

    ``wd_in_optimizer``: the weight decay is the optimizer's coupled ``weight_decay="wd"``
    (``g + wd_k p_k``) instead of the loss term; the gradient, hence the hypergradient, is the same.
    """
    p0 = init_params(dtype)
    if model == "functional":
        net = hd.functional(module_with_params(p0))  # params named 0.weight, 0.bias, 2.*
        params = net.params

        def forward(p, x):
            return net(p, x)
    else:
        params, forward = p0, mlp

    def train_loss(p, h, batch):
        x, y = batch
        if wd_in_optimizer:
            return F.cross_entropy(forward(p, x), y)
        l2 = sum(h.at("wd", param=k) * v.pow(2).sum() for k, v in p.items())
        return F.cross_entropy(forward(p, x), y) + 0.5 * l2

    def val_loss(p, h, batch):
        x, y = batch
        return F.cross_entropy(forward(p, x), y)

    hparams = hd.HyperParameters(
        lr=hd.scalar(INIT_LR[optimizer]), wd=hd.per_tensor(params, INIT_WD)
    )
    wd = "wd" if wd_in_optimizer else 0.0
    inner = hd.sgd("lr", MOMENTUM, weight_decay=wd) if optimizer == "sgd" else hd.adam(
        "lr", weight_decay=wd
    )
    return hd.make_problem(
        train_loss, val_loss, hparams, params, optimizer=inner,
        train_data=(data["x_train"].to(dtype), data["y_train"]),
        val_data=(data["x_val"].to(dtype), data["y_val"]), steps=steps, probe=False,
    )


def hyperdiff_runner(library: str, data: dict, optimizer: str, dtype):
    """``run(T) -> (val loss, g)`` with g = d/d(log lr, log wd[4]), float64, length 5."""
    from hyperdiff.methods.checkpointed import checkpointed

    model = "functional" if library == "hyperdiff-reverse-functional" else "function"
    method = checkpointed() if library == "hyperdiff-checkpointed" else hd.reverse()

    def run(steps: int):
        problem = hyperdiff_problem(
            data, optimizer, steps, dtype, model, library == "hyperdiff-reverse-optwd"
        )
        hg = method(problem)
        g = torch.cat([hg.grad["lr"].reshape(1), hg.grad["wd"].reshape(-1)])
        return hg.value, g.double(), hg.diagnostics

    return run


def peer_runner(library: str, data: dict, optimizer: str, dtype):
    module = "reference" if library == "autograd" else f"{library}_impl"
    mod = importlib.import_module(f"benchmarks.peers.{module}")
    if not mod.AVAILABLE:
        raise RuntimeError(f"unavailable: {mod.REASON}")
    prob = {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}
    p0 = init_params(dtype)
    log_lr, log_wd = initial_hyperparameters(optimizer, dtype)

    def run(steps: int):
        val, g_lr, g_wd = mod.hypergradient(prob, p0, log_lr, log_wd, optimizer, steps)
        return val, torch.cat([g_lr.reshape(1), g_wd.reshape(-1)]).double(), {}

    return run


def runner(library: str, data: dict, optimizer: str, dtype):
    if library.startswith("hyperdiff"):
        return hyperdiff_runner(library, data, optimizer, dtype)
    return peer_runner(library, data, optimizer, dtype)


def library_version(library: str) -> str | None:
    if library.startswith("hyperdiff"):
        return hd.__version__
    module = "reference" if library == "autograd" else f"{library}_impl"
    return importlib.import_module(f"benchmarks.peers.{module}").VERSION


# ---- one measurement = one fresh process ---------------------------------------------------


def proc_status_mib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (high-water mark) of this process, in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Set ``VmHWM`` to the current RSS (Linux >= 4.0). ``ru_maxrss`` is no use here: Linux
    carries the parent's RSS at fork time across exec into the child's ``ru_maxrss``."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def ops_per_step(run) -> float:
    """aten kernels dispatched per inner step (forward, backward and the reverse pass), from
    ``(ops(T=10) - ops(T=5)) / 5``: a noise-free measure of per-step work and overhead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for steps in (5, 10):
        with Count() as counter:
            run(steps)
        counts.append(counter.calls)
    return (counts[1] - counts[0]) / 5


def worker(library: str, optimizer: str, steps: int, repeats: int, data_path: str,
           count_ops: bool = True) -> dict:
    """Warm-up at T=4, then ``repeats`` timed float32 calls; peak RSS rise of the first.

    Peak memory = high-water RSS during the first T-step call minus the RSS before it: the
    tape, optimizer state and transients, plus glibc's caching (an upper bound on live tensors).
    """
    import gc

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out = {"library": library, "optimizer": optimizer, "steps": steps,
           "threads": torch.get_num_threads(), "load_start": os.getloadavg()}
    try:
        out["version"] = library_version(library)
        run = runner(library, torch.load(data_path), optimizer, torch.float32)
        run(WARM_UP_STEPS)
        gc.collect()
        reset_peak_rss()
        base = proc_status_mib("VmRSS")
        walls, cpus, sys_s, faults = [], [], [], []
        for i in range(repeats):
            gc.collect()
            u0 = resource.getrusage(resource.RUSAGE_SELF)
            c0, t0 = time.process_time(), time.perf_counter()
            val, g, diag = run(steps)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            sys_s.append(u1.ru_stime - u0.ru_stime)  # kernel time, mostly page faults
            faults.append(u1.ru_minflt - u0.ru_minflt)
            if i == 0:
                peak = proc_status_mib("VmHWM")
    except Exception as exc:  # report, never hide
        out["error"] = f"{type(exc).__name__}: {exc}".strip()
        return out
    try:
        if count_ops:
            out["ops_per_step"] = ops_per_step(run)
    except Exception as exc:
        out["ops_error"] = f"{type(exc).__name__}: {exc}"
    out.update(
        wall_s=min(walls), cpu_s=min(cpus), walls=walls, cpus=cpus, sys_s=sys_s,
        page_faults=faults, peak_mib=peak - base,
        baseline_rss_mib=base, val=val, g=g.tolist(), load_end=os.getloadavg(),
        diagnostics={k: v for k, v in diag.items() if isinstance(v, (int, float, str))},
    )
    return out


def _child(conn, library: str, optimizer: str, steps: int, repeats: int, data_path: str,
           count_ops: bool) -> None:
    try:
        conn.send(worker(library, optimizer, steps, repeats, data_path, count_ops))
    finally:
        conn.close()


def in_fresh_process(ctx, library: str, optimizer: str, steps: int, repeats: int,
                     data_path: str, count_ops: bool, timeout: float) -> dict:
    """Run :func:`worker` in a new process forked from the forkserver (imports done once)."""
    failed = {"library": library, "optimizer": optimizer, "steps": steps}
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, library, optimizer, steps, repeats, data_path,
                                            count_ops))
    proc.start()
    send.close()
    try:
        if receive.poll(timeout):
            return receive.recv()
        return {**failed, "error": f"timeout after {timeout} s"}
    except EOFError:
        proc.join()
        return {**failed, "error": f"worker died (exit code {proc.exitcode})"}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receive.close()


def start_forkserver():
    """A forkserver that imports torch, hyperdiff and the peers once; every measurement is a
    fresh process forked from it (a new address space, so its own peak RSS), without paying
    ~5-10 s of imports per measurement on a loaded machine."""
    import multiprocessing

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["__main__", "hyperdiff.methods.checkpointed", "benchmarks.peers.reference",
         *(f"benchmarks.peers.{p}_impl" for p in PEERS)]
    )
    return ctx


def merge_rounds(samples: list[dict]) -> dict:
    """One row from the rounds of one (library, cell): best times, least peak, all samples."""
    ok = [s for s in samples if "error" not in s]
    if not ok:
        return samples[0]
    row = dict(ok[0])
    row["walls"] = [w for s in ok for w in s["walls"]]
    row["cpus"] = [c for s in ok for c in s["cpus"]]
    row["sys_s"] = [c for s in ok for c in s["sys_s"]]
    row["page_faults"] = [c for s in ok for c in s["page_faults"]]
    row["wall_s"], row["cpu_s"] = min(row["walls"]), min(row["cpus"])
    row["peaks_mib"] = [s["peak_mib"] for s in ok]
    row["peak_mib"] = min(row["peaks_mib"])
    row["loads"] = [s["load_start"] for s in ok]
    row["rounds"] = len(ok)
    row.pop("load_start", None)
    row.pop("load_end", None)
    if len(ok) < len(samples):
        row["failed_rounds"] = [s["error"] for s in samples if "error" in s]
    return row


# ---- the float64 reference -----------------------------------------------------------------


def float64_reference(data: dict, optimizer: str, steps: int) -> dict:
    """hyperdiff reverse mode in float64, cross-checked against reference.py (plain autograd)."""
    from benchmarks.peers import reference

    val, g, _ = hyperdiff_runner("hyperdiff-reverse", data, optimizer, torch.float64)(steps)
    p0 = init_params(torch.float64)
    log_lr, log_wd = initial_hyperparameters(optimizer, torch.float64)
    val_r, g_lr, g_wd = reference.hypergradient(data, p0, log_lr, log_wd, optimizer, steps)
    g_r = torch.cat([g_lr.reshape(1), g_wd.reshape(-1)])
    return {"val": val, "g": g.tolist(), "reference_py_val": val_r, "reference_py_g": g_r.tolist(),
            "agreement_rel": float((g - g_r).norm() / g_r.norm())}


def errors(g: list[float], ref: list[float]) -> dict:
    """Relative errors: whole vector (norm), d/dlog lr, d/dlog wd (norm), worst coordinate."""
    g_t, r = torch.tensor(g, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    d = g_t - r
    return {"rel_err": float(d.norm() / r.norm()), "rel_err_lr": float(d[0].abs() / r[0].abs()),
            "rel_err_wd": float(d[1:].norm() / r[1:].norm()),
            "rel_err_max": float((d.abs() / r.abs()).max())}


# ---- the table -----------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    """Time ratios vs the fastest peer, memory ratios vs the least-memory peer (per cell)."""
    ok = [r for r in rows if "error" not in r and LIBRARIES[r["library"]][1] == "peer"]
    if not ok:
        return
    fastest = min(ok, key=lambda r: r["wall_s"])
    fastest_cpu = min(ok, key=lambda r: r["cpu_s"])
    leanest = min(ok, key=lambda r: r["peak_mib"])
    for r in rows:
        r["fastest_peer"], r["least_memory_peer"] = fastest["library"], leanest["library"]
        if "error" in r:
            continue
        r["x_time"] = r["wall_s"] / fastest["wall_s"]
        r["x_cpu"] = r["cpu_s"] / fastest_cpu["cpu_s"]
        r["x_mem"] = r["peak_mib"] / leanest["peak_mib"]
        r["x_mem_vs_fastest"] = r["peak_mib"] / fastest["peak_mib"]


HEADER = (f"{'opt':<4} {'T':>3}  {'library':<36} {'wall s':>7} {'x time':>6} {'cpu s':>7} "
          f"{'x cpu':>6} {'peak MiB':>8} {'x mem':>6} {'ops/step':>8} {'val loss':>8} "
          f"{'rel err':>8} {'err lr':>8} {'err wd':>8}  note")


def format_row(r: dict) -> str:
    label = LIBRARIES[r["library"]][0]
    head = f"{r['optimizer']:<4} {r['steps']:>3}  {label:<36}"
    if "error" in r:
        dashes = " ".join(f"{'-':>{w}}" for w in (7, 6, 7, 6, 8, 6, 8, 8, 8, 8, 8))
        return f"{head} {dashes}  {r['error']}"
    note = r.get("note", "")
    return (f"{head} {r['wall_s']:>7.3f} {r.get('x_time', float('nan')):>6.2f} "
            f"{r['cpu_s']:>7.3f} {r.get('x_cpu', float('nan')):>6.2f} {r['peak_mib']:>8.1f} "
            f"{r.get('x_mem', float('nan')):>6.2f} {r.get('ops_per_step') or float('nan'):>8.0f} "
            f"{r['val']:>8.5f} {r['rel_err']:>8.1e} "
            f"{r['rel_err_lr']:>8.1e} {r['rel_err_wd']:>8.1e}  {note}")


def note_for(r: dict) -> str:
    kind = LIBRARIES[r["library"]][1]
    notes = []
    if kind == "baseline":
        notes.append("baseline, not in ratios")
    if r["optimizer"] == "adam" and r["library"] in ADAM_NOTES:
        notes.append(ADAM_NOTES[r["library"]])
    if r["library"] == "hyperdiff-checkpointed" and "segments" in r.get("diagnostics", {}):
        notes.append(f"{r['diagnostics']['segments']} segments")
    return "; ".join(notes)


def headline(rows: list[dict], steps: int, variant: str) -> list[dict]:
    """The issue's targets at T=steps: time <= 0.9x the fastest peer, peak <= 0.5x."""
    out = []
    for opt in sorted({r["optimizer"] for r in rows if r["steps"] == steps}):
        cell = {r["library"]: r for r in rows if r["steps"] == steps and r["optimizer"] == opt}
        for lib in (variant, "hyperdiff-checkpointed", "hyperdiff-reverse-optwd"):
            r = cell.get(lib)
            if r is None or "error" in r or "x_time" not in r:
                continue
            fast = cell[r["fastest_peer"]]
            out.append({
                "optimizer": opt, "steps": steps, "library": lib,
                "fastest_peer": r["fastest_peer"], "least_memory_peer": r["least_memory_peer"],
                "x_time": r["x_time"], "x_cpu": r["x_cpu"],
                "x_mem_vs_fastest": r["x_mem_vs_fastest"], "x_mem_vs_least": r["x_mem"],
                "time_target_met": r["x_time"] <= 0.9 and r["x_cpu"] <= 0.9,
                "memory_target_met": r["peak_mib"] <= 0.5 * fast["peak_mib"],
            })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T in {10, 50}, SGD only")
    parser.add_argument("--steps", type=int, nargs="+", help="override the T grid")
    parser.add_argument("--optimizers", nargs="+", choices=("sgd", "adam"))
    parser.add_argument("--libraries", nargs="+", choices=list(LIBRARIES), default=list(LIBRARIES))
    parser.add_argument("--repeats", type=int, help="timed calls per process (default 5 for "
                        "T <= 10, 3 for T <= 50, else 2)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per "
                        "(library, optimizer, T), interleaved in alternating order; best of all")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per process")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    args = parser.parse_args()
    if (args.repeats is not None and args.repeats < 1) or args.rounds < 1:
        parser.error("--repeats and --rounds must be positive")

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    ctx = start_forkserver()
    steps_grid = args.steps or ([10, 50] if args.quick else [10, 50, 200])
    optimizers = args.optimizers or (["sgd"] if args.quick else ["sgd", "adam"])
    libraries = args.libraries
    started, load_start = time.time(), os.getloadavg()
    print(f"torch {torch.__version__}, hyperdiff {hd.__version__}, python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, 1 torch thread, float32; "
          f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    peers = {}
    for name in PEERS:
        mod = importlib.import_module(f"benchmarks.peers.{name}_impl")
        peers[name] = {"version": mod.VERSION, "available": mod.AVAILABLE, "reason": mod.REASON}
        status = "available" if mod.AVAILABLE else f"NOT AVAILABLE: {mod.REASON}"
        print(f"  {name} {mod.VERSION}: {status}")

    from benchmarks.peers.common import digits_problem

    data = digits_problem(torch.float64)
    refs, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "digits.pt")
        torch.save(data, data_path)
        print("\nfloat64 reference: hyperdiff reverse vs plain autograd (reference.py)")
        for opt in optimizers:
            for steps in steps_grid:
                ref = refs[(opt, steps)] = float64_reference(data, opt, steps)
                flag = "" if ref["agreement_rel"] < 1e-10 else "  MISMATCH: check the problem"
                print(f"  {opt:<4} T={steps:<3} val {ref['val']:.6f}  d/dlog lr "
                      f"{ref['g'][0]:+.6e}  relative difference {ref['agreement_rel']:.1e}{flag}")
        print(f"\n{args.rounds} round(s) x N timed calls per row, best of all; "
              f"N = {args.repeats or '5 (T<=10), 3 (T<=50), 2'}\n{HEADER}\n{'-' * len(HEADER)}")
        for opt in optimizers:
            for steps in steps_grid:
                repeats = args.repeats or (5 if steps <= 10 else 3 if steps <= 50 else 2)
                samples = {lib: [] for lib in libraries}
                for k in range(args.rounds):
                    for lib in libraries if k % 2 == 0 else libraries[::-1]:
                        samples[lib].append(in_fresh_process(
                            ctx, lib, opt, steps, repeats, data_path, k == 0, args.timeout
                        ))
                cell = [merge_rounds(samples[lib]) for lib in libraries]
                for r in cell:
                    if "error" not in r:
                        r.update(errors(r["g"], refs[(opt, steps)]["g"]))
                add_ratios(cell)
                for r in cell:
                    if "error" not in r:
                        r["note"] = note_for(r)
                    print(format_row(r), flush=True)
                rows.extend(cell)

    # the headline reverse-mode variant: the faster of the two model styles over the whole grid
    totals = {v: sum(r["wall_s"] for r in rows if r["library"] == v and "error" not in r)
              for v in REVERSE_VARIANTS if any(r["library"] == v for r in rows)}
    variant = min(totals, key=totals.get) if totals else "hyperdiff-reverse"
    target_steps = max(steps_grid)
    checks = headline(rows, target_steps, variant)
    if totals:
        print(f"\nreverse-mode model style for the headline: {LIBRARIES[variant][0]} (total wall "
              + ", ".join(f"{LIBRARIES[v][0]} {t:.2f} s" for v, t in totals.items()) + ")")
    print(f"targets at T={target_steps}: time <= 0.9x the fastest peer (wall and cpu both), "
          "peak memory <= 0.5x the fastest peer's")
    for c in checks:
        print(f"  {c['optimizer']:<4} {LIBRARIES[c['library']][0]:<36} time {c['x_time']:.3f}x "
              f"{c['fastest_peer']}, cpu {c['x_cpu']:.3f}x "
              f"({'met' if c['time_target_met'] else 'NOT met'}); memory "
              f"{c['x_mem_vs_fastest']:.3f}x {c['fastest_peer']} "
              f"({'met' if c['memory_target_met'] else 'NOT met'}), {c['x_mem_vs_least']:.3f}x "
              f"least-memory peer {c['least_memory_peer']}")
    load_end = os.getloadavg()
    print(f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; "
          f"{time.time() - started:.0f} s")

    result = {
        "benchmark": "peers", "command": " ".join(["python", "benchmarks/peers.py", *sys.argv[1:]]),
        "torch": torch.__version__, "hyperdiff": hd.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "threads": 1, "dtype": "float32",
        "loadavg_start": load_start, "loadavg_end": load_end,
        "seconds": time.time() - started, "peers": peers, "gradient_order": GRAD_NAMES,
        "float64_reference": [{"optimizer": o, "steps": t, **v} for (o, t), v in refs.items()],
        "headline_variant": variant, "headline": checks, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
