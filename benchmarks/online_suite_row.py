"""What the suite's "hd online" row counts in its time_s, split: the windows, the run directory.

``suite.py``'s online row is ``run_experiment`` (one online run with a run directory) and its
``time_s`` is the loop's clock (``HyperOptimizer.elapsed``), which runs from the first window
to the result and so also counts what the step callbacks do between windows: the fsynced
append of each record to ``history.jsonl``, the checkpoint after every window
(``loop.state_dict()``, ``torch.save``, the manifest and the checkpoint file, each written
atomically and fsynced) and the loggers. For each task this runs that row ``--repeats`` times
(the fastest kept) with the pieces timed by wrappers, beside the best of ``--repeats`` plain
trainings of the same T steps measured in the same process, and prints every piece over one
plain training. Wall time (fsync is no CPU time): noisy on a shared machine, the disk's load
most of all.

    OMP_NUM_THREADS=1 python benchmarks/online_suite_row.py --out benchmarks/results/online_suite_row.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suite_tasks"))

from suite import QUICK, TASK_DIR, TASKS, hyperdiff_row, plain_training_s  # noqa: E402

import hyperdiff as hd  # noqa: E402
from hyperdiff.app.rundir import RunDir  # noqa: E402
from hyperdiff.tuner.driver import HyperOptimizer  # noqa: E402

# (label, the methods whose wall time it sums); the experiment's checkpoint after a window is
# loop.state_dict() and RunDir.save_checkpoint (torch.save, manifest, checkpoint file)
PIECES: tuple[tuple[str, tuple[tuple[type, str], ...]], ...] = (
    ("windows (loop.step)", ((HyperOptimizer, "step"),)),
    ("checkpoints (state_dict, save_checkpoint)",
     ((HyperOptimizer, "state_dict"), (RunDir, "save_checkpoint"))),
    ("records (history.jsonl append)", ((RunDir, "append"),)),
)
REST = "rest (callbacks, loggers, progress)"


def _timed(times: collections.Counter[str], label: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[label] += time.perf_counter() - started
    return wrapper


def timed_row(ref: str, workdir: Path, tag: str) -> tuple[dict[str, Any], dict[str, float]]:
    """One suite online row and its pieces' wall seconds."""
    times: collections.Counter[str] = collections.Counter()
    saved = {(cls, name): getattr(cls, name) for _, methods in PIECES for cls, name in methods}
    try:
        for label, methods in PIECES:
            for cls, name in methods:
                setattr(cls, name, _timed(times, label, saved[(cls, name)]))
        row, _ = hyperdiff_row(ref, "online", QUICK, 1.0, tag, workdir)
    finally:
        for (cls, name), fn in saved.items():
            setattr(cls, name, fn)
    return row, {label: times[label] for label, _ in PIECES}


def run_task(name: str, repeats: int, workdir: Path) -> dict[str, Any]:
    """The fastest of ``repeats`` online rows of task ``name`` and the plain training's
    best of ``repeats`` (before and after)."""
    ref = f"{TASK_DIR / name}.py:build"
    task = hd.tasks.build_task(ref)
    plain = plain_training_s(task, repeats)
    best: tuple[dict[str, Any], dict[str, float]] | None = None
    for i in range(repeats):
        row, pieces = timed_row(ref, workdir, f"{name}-{i}")
        if "note" in row:
            return {"task": name, "note": row["note"]}
        if best is None or row["time_s"] < best[0]["time_s"]:
            best = (row, pieces)
    plain = min(plain, plain_training_s(task, repeats))
    assert best is not None
    row, pieces = best
    pieces[REST] = row["time_s"] - sum(pieces.values())
    return {"task": name, "plain_training_s": plain, "time_s": row["time_s"],
            "pieces_s": pieces, "over_plain": {k: v / plain for k, v in pieces.items()},
            "time_ratio": row["time_s"] / plain,
            "own_model_test_loss": row["online_model_test"]["loss"]}


def table(blocks: list[dict[str, Any]]) -> str:
    shown = [b for b in blocks if "pieces_s" in b]
    labels = [label for label, _ in PIECES] + [REST]
    lines = ["| wall time over one plain training | " + " | ".join(b["task"] for b in shown)
             + " |", "|---|" + "---|" * len(shown)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(
            f"{b['over_plain'].get(label, 0.0):.2f}" for b in shown) + " |")
    lines.append("| time_s (the suite's time_ratio) | " + " | ".join(
        f"{b['time_ratio']:.2f}" for b in shown) + " |")
    lines.append("| plain training (s) | " + " | ".join(
        f"{b['plain_training_s']:.3f}" for b in shown) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "online_suite_row.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        blocks = [run_task(name, args.repeats, Path(tmp)) for name in args.tasks]
    for b in blocks:
        if "note" in b:
            print(f"{b['task']}: {b['note']}")
    print(table(blocks))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "torch": torch.__version__,
                                    "tasks": blocks}, indent=1, default=lambda x: math.nan))


if __name__ == "__main__":
    main()
