"""What the run directory's safety costs per outer step: lock-free bookkeeping, not training.

For each task's real driver state (after two outer steps) this times, side by side in one
process, interleaved over ``--repeats`` rounds:

- ``bare``: what the run directory did before the manifest: ``torch.save`` to a fixed
  temporary name, fsync, ``os.replace``, and one fsynced append to the history;
- ``rundir``: ``RunDir.save_checkpoint`` (manifest listing the new checkpoint, exclusive
  random temporary file, ``O_NOFOLLOW``, fsync of file and directory) and ``RunDir.append``;
- ``verify``: what a resume adds: sha256 of the checkpoint and the history, record checks;

and compares them with the time of one outer step of the task. Timings on a shared machine
are noisy (fsync depends on the disk and on everyone else); the ratios in one run are the
point.

    OMP_NUM_THREADS=1 python benchmarks/rundir_overhead.py

Writes benchmarks/results/rundir.json (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hyperdiff.app.config import load_config
from hyperdiff.app.experiment import build
from hyperdiff.app.rundir import RunDir
from hyperdiff.app.rundir.directory import HISTORY

TASKS = ("ridge_diabetes", "mlp_digits", "reweight_digits")
RESULTS = Path(__file__).parent / "results" / "rundir.json"


def bare_save(directory: Path, state: dict, line: str) -> None:
    tmp = directory / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, directory / "checkpoint.pt")
    with open(directory / "history.jsonl", "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def measure(task_name: str, repeats: int) -> dict:
    # no global phase: its points (mlp_digits starts weak) are plain trainings, not steps
    config = load_config(overrides=[f"task.name={task_name}", "stop.max_steps=3",
                                    "outer.explore=0"])
    task, driver = build(config)
    started = time.perf_counter()
    records = [driver.step(), driver.step()]
    step_s = (time.perf_counter() - started) / 2
    state = driver.state_dict()
    times: dict[str, list[float]] = {"bare": [], "rundir": [], "verify": []}
    with tempfile.TemporaryDirectory(dir=".") as root:
        bare_dir = Path(root) / "bare"
        bare_dir.mkdir()
        run = RunDir.create(Path(root) / "run")
        with run.lock():
            run.start(config.to_toml(), task.hparams)
            for record in records:
                run.append(record)
            for _ in range(repeats):
                t0 = time.perf_counter()
                bare_save(bare_dir, state, records[-1].to_json())
                t1 = time.perf_counter()
                run.save_checkpoint(state)
                run.append(records[-1])  # timing only: the history is rewritten below
                t2 = time.perf_counter()
                times["bare"].append(t1 - t0)
                times["rundir"].append(t2 - t1)
            lines = (run.path / HISTORY).read_text().splitlines()[:2]
            (run.path / HISTORY).write_text("".join(line + "\n" for line in lines))
            state["step"] = 2
            run.save_checkpoint(state)
            for _ in range(repeats):
                fresh = RunDir(run.path)
                t0 = time.perf_counter()
                fresh.config_path()
                fresh.load_history(int(fresh.load_checkpoint()["step"]))  # type: ignore[index]
                times["verify"].append(time.perf_counter() - t0)
        size = (run.path / "checkpoint.pt").stat().st_size
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"task": task_name, "checkpoint_bytes": size, "outer_step_s": step_s,
            **{f"{k}_s": v for k, v in medians.items()},
            "rundir_over_bare": medians["rundir"] / medians["bare"],
            "rundir_share_of_step": medians["rundir"] / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"result file (default: {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name, args.repeats) for name in TASKS]
    print(f"{'task':<16}{'ckpt KB':>9}{'step ms':>10}{'bare ms':>10}{'rundir ms':>11}"
          f"{'ratio':>7}{'of step':>9}{'verify ms':>11}")
    for r in rows:
        print(f"{r['task']:<16}{r['checkpoint_bytes'] / 1024:>9.1f}{1e3 * r['outer_step_s']:>10.1f}"
              f"{1e3 * r['bare_s']:>10.2f}{1e3 * r['rundir_s']:>11.2f}{r['rundir_over_bare']:>7.2f}"
              f"{100 * r['rundir_share_of_step']:>8.1f}%{1e3 * r['verify_s']:>11.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
