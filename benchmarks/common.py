"""Shared pieces of the benchmark scripts: digits data, an MLP problem, and measurement of
wall time and peak memory in a fresh subprocess."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import hyperdiff as hd


def digits(dtype: torch.dtype = torch.float32, n_train: int = 1000, n_val: int = 400):
    """scikit-learn's digits scaled to [0, 1]: (x_train, y_train, x_val, y_val)."""
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=dtype)
    y = torch.tensor(data.target, dtype=torch.long)
    return x[:n_train], y[:n_train], x[n_train : n_train + n_val], y[n_train : n_train + n_val]


def mlp_params(dtype: torch.dtype, hidden: int = 128) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))
    return {k: v.detach().to(dtype) for k, v in module.named_parameters()}


def mlp(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(torch.addmm(p["0.bias"], x, p["0.weight"].T))
    return torch.addmm(p["2.bias"], h, p["2.weight"].T)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM). Unlike ``ru_maxrss``, it does
    not inherit the parent's RSS at fork, which would hide peaks smaller than the parent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(run: Callable[[], object], repeats: int) -> dict[str, float]:
    """Best wall time over ``repeats`` calls, and peak RSS growth over the RSS before them."""
    base = rss_bytes()
    reset_peak_rss()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return {"time_s": best, "peak_mb": max(0, peak_rss_bytes() - base) / 2**20}


FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc raises its mmap threshold each time a large block is freed, after which freed tensor
memory is kept in the heap and fragments: a loop that allocates and frees same-sized tensors
(forward mode over T steps) then grows its RSS with T although live memory does not. A fixed
threshold turns that off, so peak RSS measures what the algorithm holds."""


def in_subprocess(script: str, *args: str, env_extra: dict[str, str] | None = None) -> dict:
    """Run ``python script --worker args...`` and parse the JSON line it prints last."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.update(env_extra or {})
    out = subprocess.run(
        [sys.executable, script, "--worker", *args], capture_output=True, text=True, env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cross_entropy_losses(l2_of: Callable[[dict, hd.hyperparams.HParamView], torch.Tensor]):
    """Train loss = cross-entropy + l2_of(params, hparams); validation loss = cross-entropy."""

    def train_loss(p, h, batch):
        x, y = batch
        return F.cross_entropy(mlp(p, x), y) + l2_of(p, h)

    def val_loss(p, h, batch):
        x, y = batch
        return F.cross_entropy(mlp(p, x), y)

    return train_loss, val_loss
