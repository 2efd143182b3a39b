"""Prototype, measured and not adopted (s34): an online outer Adam whose second moment is shared
by the entries of each hyperparameter.

The online default's outer Adam normalises every raw coordinate by its own RMS, so each of
``logistic_wide``'s 500 penalties and ``reweight``'s 989 weights moves by about the outer lr per
window whatever the size of its hypergradient (docs/online.md). Variants, per hyperparameter
``h`` with entries ``i`` (``m``, ``v`` Adam's bias-corrected moments, ``V_h`` the average of
``g_i^2`` over the entries of ``h``)::

    adam    u_i -= lr m_i / (sqrt(v_i) + eps)                       (the default)
    shared  u_i -= lr m_i / (sqrt(V_h) + eps)                       (one RMS per hyperparameter)
    floor   u_i -= lr m_i / max(sqrt(V_h) + eps, sqrt(v_i) + eps)   (never a longer step than Adam)
    cap     u_i -= lr m_i / max(sqrt(V_h) + eps, (sqrt(v_i) + eps) / 3)

A scalar hyperparameter moves as with Adam in every variant. The variants are patched into
the loop (the package has no such outer optimizer); each row is an online run per training
seed 1000000-1000002, the own model's test loss and the final values retrained on the report
seeds, both as means over the three runs.

    OMP_NUM_THREADS=1 python benchmarks/online_shared_moment.py   # ~3 min

Writes ``benchmarks/results/online_shared_moment_s34.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

import hyperdiff.tuner.driver as driver
from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import run_experiment

HERE = Path(__file__).resolve().parent
SUITE = HERE / "suite_tasks"
RUNS = {  # row -> (task, extra overrides)
    "logistic_wide": (f"{SUITE / 'logistic_wide.py'}:build", []),
    "logistic_wide x0.01": (f"{SUITE / 'logistic_wide.py'}:build_lr_x0p01", []),
    "logistic_wide x0.1": (f"{SUITE / 'logistic_wide.py'}:build_lr_x0p1", []),
    "logistic_wide x10": (f"{SUITE / 'logistic_wide.py'}:build_lr_x10", []),
    "reweight": (f"{SUITE / 'reweight.py'}:build", []),
    "logistic_cancer": ("logistic_cancer", []),
    "logistic_digits": ("logistic_digits", ["task.cv_folds=0"]),  # CV is offline only
    "mlp_digits": ("mlp_digits", []),
}
MODES = ("adam", "shared", "floor", "cap")
SEEDS = (1000000, 1000001, 1000002)


class SharedMomentAdam(torch.optim.Optimizer):
    """Adam on one flat leaf of raw values whose second moment is shared per hyperparameter
    (``sizes``: the entries of each, in the leaf's order); ``mode`` ``shared``, ``floor`` or
    ``cap`` as in the module doc (``adam`` is torch's own)."""

    def __init__(self, params: Any, lr: float, sizes: list[int], mode: str,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.sizes, self.mode = sizes, mode

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p),
                                 shared=torch.zeros(len(self.sizes), dtype=p.dtype))
                state["t"] += 1
                t, g = state["t"], p.grad
                state["m"].mul_(beta1).add_(g, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                squares = torch.stack([c.square().mean() for c in g.split(self.sizes)])
                state["shared"].mul_(beta2).add_(squares, alpha=1 - beta2)
                own = (state["v"] / (1 - beta2 ** t)).sqrt() + group["eps"]
                rms = (state["shared"] / (1 - beta2 ** t)).sqrt() + group["eps"]
                shared = torch.cat([r.expand(n) for r, n in zip(rms, self.sizes, strict=True)])
                denominator = {"shared": shared, "floor": torch.maximum(shared, own),
                               "cap": torch.maximum(shared, own / 3)}[self.mode]
                p.add_(-group["lr"] * (state["m"] / (1 - beta1 ** t)) / denominator)


ORIGINAL_OUTER = driver.outer_optimizer
ORIGINAL_INIT = driver.HyperOptimizer.__init__
BUILDING: dict[str, Any] = {}  # "loop": the HyperOptimizer whose outer optimizer is being built


def _recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
    BUILDING["loop"] = self
    ORIGINAL_INIT(self, *args, **kwargs)


def patch(mode: str) -> None:
    """Make the loop's ``adam`` (the online default) :class:`SharedMomentAdam` in ``mode``
    (``adam``: torch's, unpatched)."""

    def outer_optimizer(name: str) -> Any:
        if name != "adam" or mode == "adam":
            return ORIGINAL_OUTER(name)

        def make(leaves: list[torch.Tensor], lr: float, **options: Any) -> torch.optim.Optimizer:
            sizes = [int(v.numel()) for v in BUILDING["loop"].hparams.raw.values()]
            return SharedMomentAdam(leaves, lr, sizes, mode, **options)

        return make

    driver.outer_optimizer = outer_optimizer  # type: ignore[assignment]


def row(task: str, extra: list[str]) -> dict[str, Any]:
    own, retrained = [], []
    for seed in SEEDS:
        config = load_config(overrides=[f"task.name={task}", "outer.mode=online",
                                        f"outer.train_seed={seed}", *extra])
        with tempfile.TemporaryDirectory() as tmp:
            result = run_experiment(config, out=Path(tmp) / "run", log=lambda _: None,
                                    progress=False)
        own.append(result["online_model"]["test"]["loss"])
        retrained.append(result["tuned"]["metrics"]["test"]["loss"])
    return {"own_model_test_mean": statistics.fmean(own), "own_per_seed": own,
            "retrained_test_mean": statistics.fmean(retrained)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path,
                        default=HERE / "results" / "online_shared_moment_s34.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    driver.HyperOptimizer.__init__ = _recording_init  # type: ignore[method-assign]
    rows = []
    for mode in args.modes:
        patch(mode)
        for name in args.runs:
            task, extra = RUNS[name]
            found = {"run": name, "mode": mode, **row(task, extra)}
            print(f"{name:22s} {mode:7s} own model {found['own_model_test_mean']:.4f}  "
                  f"retrained {found['retrained_test_mean']:.4f}", flush=True)
            rows.append(found)
        driver.outer_optimizer = ORIGINAL_OUTER  # type: ignore[assignment]
    args.out.write_text(json.dumps({"command": "OMP_NUM_THREADS=1 python "
                                    "benchmarks/online_shared_moment.py", "rows": rows},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
