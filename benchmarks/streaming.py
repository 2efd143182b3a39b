"""Streaming data: what the replayable path costs per batch against a plain DataLoader, and
that one hypergradient reads the batches it trains on, whatever the data set size.

**Time per batch** (``--speed``): an MLP regressor's data, 80,000 rows of 32 float32 features and
a float32 target, batch 256, read for ``--batches`` (200) consecutive batches, first to last
(worker start-up included), by a plain ``DataLoader`` (``next()`` on its iterator) and by
hyperdiff's replayable path (``hd.data.stream(loader)``, ``check(T)`` as a problem does, then
``batch(t, seed)`` for ``t < T``: shuffle, fetch, first-read finiteness check and replay
fingerprint). Loaders: a ``TensorDataset`` (shuffled), a map-style ``Dataset`` without
``__getitems__`` (shuffled), the same with a random augmentation drawn from torch's global
generator in ``__getitem__`` (hyperdiff seeds each of its samples), and an ``IterableDataset``
yielding rows; each with ``num_workers`` 0 and 2. Plain and hyperdiff alternate, best of
``--repeats`` (5) each; the table prints ms per batch and hyperdiff / plain.

**Memory and reads** (``--memory``):

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
  bookkeeping). Target: within 10% between the two sizes for tensor and RSS peaks; Python
  peaks may differ by one chunk of the shuffle (32,768 int64 indices and their temporaries,
  reached only by a data set larger than one chunk).

A reference row iterates the same ``DataLoader`` for T batches with plain torch (its
``RandomSampler`` draws ``torch.randperm(n).tolist()``: a Python list of n ints per epoch).

    python benchmarks/streaming.py        # both, about 2 minutes
    python benchmarks/streaming.py --speed --repeats 7

Writes benchmarks/results/streaming.json (``speed`` and ``memory``; ``--out`` elsewhere).
Timings on a shared machine are noisy: compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import tracemalloc
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_subprocess, peak_rss_bytes, reset_peak_rss, rss_bytes

import hyperdiff as hd
from hyperdiff.diagnose.check import peak_memory

RESULTS = Path(__file__).resolve().parent / "results" / "streaming.json"
STEPS, BATCH, FEATURES, CLASSES = 50, 128, 32, 10
SIZES = (1_000, 1_000_000)
ROWS, WIDTH, READ_BATCH = 80_000, 32, 256  # the time-per-batch table


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


def regression_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """80,000 rows: ``x ~ N(0, I_32)``, ``y = x @ w + noise`` (float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, WIDTH, generator=g)
    return x, x @ torch.randn(WIDTH, generator=g) + 0.1 * torch.randn(ROWS, generator=g)


class Rows(Dataset):
    """Map-style, no ``__getitems__``: ``(x_i, y_i)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class AugmentedRows(Rows):
    """``(x_i + 0.01 * noise, y_i)``, the noise from torch's global generator."""

    def __getitem__(self, i: int):
        return self.x[i] + 0.01 * torch.randn(WIDTH), self.y[i]


class StreamedRows(IterableDataset):
    """The rows in order, one at a time (each worker its share)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(first, self.x.shape[0], step):
            yield self.x[i], self.y[i]


def loaders(workers: int) -> dict[str, DataLoader]:
    x, y = regression_rows()
    options = dict(batch_size=READ_BATCH, num_workers=workers)
    return {"TensorDataset": DataLoader(TensorDataset(x, y), shuffle=True, **options),
            "Dataset": DataLoader(Rows(x, y), shuffle=True, **options),
            "Dataset+augment": DataLoader(AugmentedRows(x, y), shuffle=True, **options),
            "IterableDataset": DataLoader(StreamedRows(x, y), **options)}


def plain_seconds(loader: DataLoader, batches: int) -> float:
    start = time.perf_counter()
    iterator = iter(loader)
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator  # stop its workers before the next measurement
    return seconds


def hyperdiff_seconds(loader: DataLoader, batches: int) -> float:
    start = time.perf_counter()
    source = hd.data.stream(loader)
    source.check(batches, 0)
    for step in range(batches):
        source.batch(step, 0)
    seconds = time.perf_counter() - start
    del source
    return seconds


def speed(batches: int, repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for workers in (0, 2):
        for kind, loader in loaders(workers).items():
            best = {"plain": float("inf"), "hyperdiff": float("inf")}
            for _ in range(repeats):  # alternate, so that both see the same load
                best["plain"] = min(best["plain"], plain_seconds(loader, batches))
                best["hyperdiff"] = min(best["hyperdiff"], hyperdiff_seconds(loader, batches))
            plain, ours = (1e3 * best[k] / batches for k in ("plain", "hyperdiff"))
            rows.append({"dataset": kind, "num_workers": workers, "plain_ms": plain,
                         "hyperdiff_ms": ours, "ratio": ours / plain})
            print(f"{kind:<17}{workers:>8}{plain:>11.3f}{ours:>13.3f}{ours / plain:>8.2f}",
                  flush=True)
    return rows


def memory() -> dict:
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
    return {"steps": STEPS, "batch": BATCH, "target_samples": target, "rows": rows,
            "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", action="store_true", help="only the time-per-batch table")
    parser.add_argument("--memory", action="store_true", help="only the memory table")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results: dict = {}
    if not args.memory:
        print(f"ms per batch of {READ_BATCH}, {ROWS:,} rows x {WIDTH} features, {args.batches} "
              f"batches from a fresh start, best of {args.repeats}")
        print(f"{'dataset':<17}{'workers':>8}{'plain ms':>11}{'hyperdiff ms':>13}{'ratio':>8}")
        results["speed"] = {"rows_in_data": ROWS, "features": WIDTH, "batch": READ_BATCH,
                            "batches": args.batches, "repeats": args.repeats,
                            "rows": speed(args.batches, args.repeats)}
    if not args.speed:
        results["memory"] = memory()
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
