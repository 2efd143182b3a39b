"""What online tuning inside a Lightning Trainer costs: ``trainer.fit`` with
``HyperdiffCallback`` against the same plain ``trainer.fit`` at fixed values.

The module, data and values are those of ``examples/lightning_task.py`` (an MLP on digits,
warmup-cosine lr and per-tensor weight decay, SGD with momentum). Both fits run side by side in
one process, alternating, best of ``--repeats``; the plain fit uses the same exported optimizer
and scheduler at the initial values, so the two differ only by the callback (its batch feed,
value writes, window replays with their hypergradients, outer steps, state checks). Timings on
a shared machine are noisy: compare the ratio, not the seconds.

    python benchmarks/lightning_online.py [--epochs 2] [--window 4] [--repeats 3]

Writes benchmarks/results/lightning_online.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import hyperdiff as hd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import lightning_task as example  # noqa: E402

from hyperdiff.app.lightning import HyperdiffCallback, lightning_optimizers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "lightning_online.json"


def fit_seconds(root: str, data: example.Digits, callback: HyperdiffCallback | None,
                make_optimizers) -> float:
    module = example.DigitsMLP(tuned=make_optimizers)
    start = time.perf_counter()
    example.trainer(root, [callback] if callback else []).fit(module, datamodule=data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    example.EPOCHS = args.epochs
    data = example.Digits()
    steps = args.epochs * -(-1000 // example.BATCH_SIZE)
    lr = hd.schedule("warmup_cosine", steps)
    times: dict[str, list[float]] = {"plain": [], "callback": []}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.repeats):
            hparams = hd.HyperParameters(
                **lr.hyperparameters(peak=0.01, warmup=0.05, final=0.05),
                weight_decay=hd.per_tensor(dict(example.DigitsMLP().named_parameters()), 1e-4))
            callback = HyperdiffCallback(hparams, schedules={"lr": lr}, window=args.window,
                                         lr=0.1, val_batch_size=200)
            times["callback"].append(fit_seconds(root, data, callback, None))
            initial = hparams  # the plain fit at the values the tuned one started from
            times["plain"].append(fit_seconds(
                root, data, None,
                lambda m, h=initial, c=callback: lightning_optimizers(c.optimizer, h, m)))
    best = {k: min(v) for k, v in times.items()}
    ratio = best["callback"] / best["plain"]
    print(f"{steps} optimizer steps, window {args.window}, best of {args.repeats}")
    print(f"{'fit':<10}{'best s':>10}{'ratio':>8}   all s")
    for name in ("plain", "callback"):
        print(f"{name:<10}{best[name]:>10.3f}{best[name] / best['plain']:>8.2f}   "
              + " ".join(f"{t:.3f}" for t in times[name]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": steps, "window": args.window, "times_s": times,
                                    "best_s": best, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
