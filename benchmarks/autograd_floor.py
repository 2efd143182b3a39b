"""The autograd floor of an exact reverse-mode hypergradient on the suite's GRU and LM tasks.

``benchmarks/suite.py`` asks for one offline outer step at <= 2.2x one plain training on every
task; ``gru_seq`` and ``char_lm`` measure 3.2-4.0x. Is that hyperdiff's overhead or the price of
the graph? This script times, per task, in one process (``OMP_NUM_THREADS=1``, best of
``--repeats``):

- hand-written: the task's own model (``gru_seq.Counter``, ``char_lm``'s one-block
  transformer) trained by a plain AdamW loop written
  here (no graph), and the same loop with ``create_graph=True`` gradients and one backward
  pass of the validation loss to the learning rate and the weight decay: what any exact
  reverse-mode hypergradient (autograd through the unrolled steps, as in higher or TorchOpt)
  must compute, with none of hyperdiff's machinery;
- hyperdiff: ``trained_params`` (the suite's plain training) and the task's configured method
  called alone (``hyperdiff run``'s offline default), on the task as the suite builds it.

The ratio hand-written hypergradient / hand-written plain training is the floor for this model
on this machine; hyperdiff's ratio beside it shows how far above the floor its step is.

    OMP_NUM_THREADS=1 python benchmarks/autograd_floor.py

Writes ``benchmarks/results/autograd_floor.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "suite_tasks"))
import char_lm  # noqa: E402
import gru_seq  # noqa: E402

from hyperdiff.app.config import load_config  # noqa: E402
from hyperdiff.app.plans import build  # noqa: E402
from hyperdiff.app.tasks.base import trained_params  # noqa: E402

BETAS, EPS = (0.9, 0.999), 1e-8
TASKS: dict[str, Any] = {"gru_seq": gru_seq, "char_lm": char_lm}


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position: (B, C) or (B, L, C) logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def hand_written(task: Any, steps: int, batch: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(plain training, reverse-mode hypergradient) of ``task``'s model written out here."""
    splits = task.data(0)
    model = task.make_model(0)
    (x, y), (xv, yv) = splits["train"], splits["val"]
    rows = [torch.randint(len(x), (batch,), generator=torch.Generator().manual_seed(t))
            for t in range(steps)]
    start = {k: v.detach() for k, v in model.named_parameters()}

    def train(lr: torch.Tensor, wd: torch.Tensor, graph: bool) -> dict[str, torch.Tensor]:
        """AdamW (decoupled decay, bias-corrected) for ``steps`` minibatches."""
        params = {k: v.clone().requires_grad_() for k, v in start.items()}
        m = {k: torch.zeros_like(v) for k, v in params.items()}
        s = {k: torch.zeros_like(v) for k, v in params.items()}
        for t, idx in enumerate(rows):
            loss = cross_entropy(functional_call(model, params, (x[idx],)), y[idx])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=graph)
            new = {}
            for (k, p), g in zip(params.items(), grads, strict=True):
                m[k] = BETAS[0] * m[k] + (1 - BETAS[0]) * g
                s[k] = BETAS[1] * s[k] + (1 - BETAS[1]) * g * g
                step = (m[k] / (1 - BETAS[0] ** (t + 1))) / (
                    (s[k] / (1 - BETAS[1] ** (t + 1))).sqrt() + EPS)
                p = p * (1 - lr * wd) - lr * step
                new[k] = p if graph else p.detach().requires_grad_()
            if not graph:
                m = {k: v.detach() for k, v in m.items()}
                s = {k: v.detach() for k, v in s.items()}
            params = new
        return params

    def plain() -> None:
        train(torch.tensor(task.LR), torch.tensor(0.01), graph=False)

    def hypergradient() -> None:
        lr = torch.tensor(task.LR, requires_grad=True)
        wd = torch.tensor(0.01, requires_grad=True)
        trained = train(lr, wd, graph=True)
        val = cross_entropy(functional_call(model, trained, (xv,)), yv)
        torch.autograd.grad(val, [lr, wd])

    return plain, hypergradient


def best_of(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times[1:])


def measure(name: str, repeats: int) -> dict[str, Any]:
    """One task's four timings and their ratios."""
    ref = f"{HERE / 'suite_tasks' / name}.py:build"
    _task, loop = build(load_config(overrides=[f"task.name={ref}", "outer.mode=offline"]))
    problem, raw = loop.problems[0], loop.raw
    plain, hyper = hand_written(TASKS[name], problem.steps, TASKS[name].BATCH_SIZE)
    kinds = {"hand-written plain": plain, "hand-written hypergradient": hyper,
             "hyperdiff plain": lambda: trained_params(problem, raw, seed=0),
             "hyperdiff hypergradient": lambda: loop.method(problem, raw)}
    seconds = {kind: best_of(run, repeats) for kind, run in kinds.items()}
    ratios = {"hand-written": seconds["hand-written hypergradient"] / seconds["hand-written plain"],
              "hyperdiff": seconds["hyperdiff hypergradient"] / seconds["hyperdiff plain"],
              "hyperdiff hypergradient / hand-written plain":
                  seconds["hyperdiff hypergradient"] / seconds["hand-written plain"]}
    print(f"{name}:")
    for kind, value in seconds.items():
        print(f"  {kind:28s} {value:7.3f} s")
    for kind, value in ratios.items():
        print(f"  ratio {kind:45s} {value:5.2f}x")
    return {"task": name, "steps": problem.steps, "method": loop.method.name,
            "seconds": seconds, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "autograd_floor.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    blocks = [measure(name, args.repeats) for name in args.tasks]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "repeats": args.repeats, "torch": torch.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "tasks": blocks,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
