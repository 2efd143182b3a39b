"""Streaming data: one hypergradient reads the batches it trains on, whatever the data set size.

One reverse-mode hypergradient (T = 50 steps of SGD momentum, batch 128, a 32-64-10 tanh MLP,
float32) through a shuffled ``DataLoader`` over a synthetic map-style data set whose samples are
generated in ``__getitem__`` from their index (nothing is stored), of 1,000 and of 1,000,000
samples. Each size runs in a fresh subprocess and reports:

- samples read (``__getitem__`` calls) against the target ``T * batch`` plus one prefetch window
  (no workers here: the window is 0 batches);
- peak RSS growth (VmHWM after a reset, above the RSS before the call), peak Python
  allocations (``tracemalloc``) and peak live torch tensor bytes
  (``hyperdiff.diagnose.check.peak_memory``, torch's profiler allocator events), each over its own
  run of problem construction plus the hypergradient (the tools would count each other's
  bookkeeping). Target: within 10% between the two sizes.

A reference row iterates the same ``DataLoader`` for T batches with plain torch (its
``RandomSampler`` draws ``torch.randperm(n).tolist()``: a Python list of n ints per epoch).

    python benchmarks/streaming.py        # about 30 s

Writes benchmarks/results/streaming.json. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import tracemalloc
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_subprocess, peak_rss_bytes, reset_peak_rss, rss_bytes

import hyperdiff as hd
from hyperdiff.diagnose.check import peak_memory

RESULTS = Path(__file__).resolve().parent / "results" / "streaming.json"
STEPS, BATCH, FEATURES, CLASSES = 50, 128, 32, 10
SIZES = (1_000, 1_000_000)


class Synthetic(Dataset):
    """Sample ``i``: ``x ~ N(0, I)`` from a generator seeded by ``i``; label ``argmax(W x)``."""

    def __init__(self, n: int):
        self.n, self.reads = n, 0
        self.w = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads += 1
        x = torch.randn(FEATURES, generator=torch.Generator().manual_seed(int(i)))
        return x, int((self.w @ x).argmax())


def _problem(loader: DataLoader, val) -> hd.Problem:
    torch.manual_seed(0)
    net = hd.functional(torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 64), torch.nn.Tanh(), torch.nn.Linear(64, CLASSES)))

    def val_loss(p, h, batch):
        x, y = batch
        return F.cross_entropy(net(p, x), y)

    def train_loss(p, h, batch):
        return val_loss(p, h, batch) + h["wd"] * sum((v**2).sum() for v in p.values())

    hp = hd.HyperParameters(lr=hd.scalar(0.1), wd=hd.scalar(1e-4))
    return hd.make_problem(train_loss, val_loss, hp, net.params, optimizer=hd.sgd("lr", 0.9),
                           train_data=loader, val_data=val, steps=STEPS, seed=0)


def _measure(fn, data: Synthetic) -> dict:
    """Three runs of ``fn`` (each builds its own problem, so each reads afresh): peak RSS
    growth and samples read, then tracemalloc's peak, then the profiler's tensor peak."""
    base = rss_bytes()
    reset_peak_rss()
    data.reads = 0
    start = time.perf_counter()
    fn()
    seconds, reads = time.perf_counter() - start, data.reads
    rss_peak = peak_rss_bytes()
    tracemalloc.start()
    fn()
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tensor_peak = peak_memory(fn)[1]
    return {"samples_read": reads, "time_s": seconds, "python_peak_mb": python_peak / 2**20,
            "tensor_peak_mb": tensor_peak / 2**20, "rss_growth_mb": max(0, rss_peak - base) / 2**20,
            "rss_peak_mb": rss_peak / 2**20}


def worker(mode: str, n: int) -> dict:
    torch.set_num_threads(1)
    data = Synthetic(n)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    val = [Synthetic(256)[i] for i in range(256)]
    val_batch = (torch.stack([x for x, _ in val]), torch.tensor([y for _, y in val]))
    # warm up torch's first-call allocations on another (tiny) data set
    hd.reverse()(_problem(DataLoader(Synthetic(256), batch_size=BATCH, shuffle=True), val_batch))
    if mode == "hyperdiff":
        row = _measure(lambda: hd.reverse()(_problem(loader, val_batch)).value, data)
    else:
        def plain() -> int:  # epoch after epoch, as torch users iterate
            epochs = itertools.chain.from_iterable(iter(loader) for _ in range(STEPS))
            return sum(int(y.shape[0]) for _, y in itertools.islice(epochs, STEPS))
        row = _measure(plain, data)
    return {"mode": mode, "n": n, **row}


def main() -> None:
    rows = [in_subprocess(__file__, mode, str(n))
            for mode in ("hyperdiff", "plain_torch") for n in SIZES]
    target = STEPS * BATCH
    print(f"one reverse hypergradient, T={STEPS}, batch {BATCH} (target: samples read <= "
          f"{target} + prefetch window 0)")
    header = (f"{'reader':<12}{'samples':>10}{'read':>8}{'python MB':>11}{'tensor MB':>11}"
              f"{'RSS+ MB':>9}{'RSS MB':>8}{'time s':>8}")
    print(header)
    for r in rows:
        print(f"{r['mode']:<12}{r['n']:>10,}{r['samples_read']:>8}{r['python_peak_mb']:>11.2f}"
              f"{r['tensor_peak_mb']:>11.2f}{r['rss_growth_mb']:>9.2f}{r['rss_peak_mb']:>8.1f}"
              f"{r['time_s']:>8.2f}")
    small, large = rows[0], rows[1]
    checks = {
        "samples_read_within_target": all(r["samples_read"] <= target for r in rows[:2]),
        "python_peak_ratio": large["python_peak_mb"] / small["python_peak_mb"],
        "tensor_peak_ratio": large["tensor_peak_mb"] / small["tensor_peak_mb"],
        "rss_growth_ratio": (large["rss_growth_mb"] + 1e-9) / (small["rss_growth_mb"] + 1e-9),
        "rss_peak_ratio": large["rss_peak_mb"] / small["rss_peak_mb"],
    }
    print("1M / 1k:", ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in checks.items()))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"steps": STEPS, "batch": BATCH, "target_samples": target,
                                   "rows": rows, "checks": checks}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
