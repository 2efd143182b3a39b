"""Golden runs: record every built-in task's history and result, then check a change keeps them.

A refactoring that must not change the numerics records before the change and checks after:

    python tools/golden_runs.py record /tmp/golden      # on the code before the change
    python tools/golden_runs.py check /tmp/golden       # on the code after it

``record`` runs each built-in task offline and online with short budgets through the CLI
(``hyperdiff run``) and keeps ``history.jsonl`` and ``result.json`` without their timing fields
and paths; it also leaves, per mode, a run directory interrupted by Ctrl-C (SIGINT) after its
second step. ``check`` runs the same commands again and resumes a copy of each interrupted
directory, and compares everything byte for byte (floats as ``repr``). It prints one line per
case and exits 1 on the first kind of difference it finds. A case that fails with an error
records the error's last line, which must then be the same.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TIMING = {"time_s", "step_time_s", "wall_s", "run_dir", "elapsed_s", "started", "finished"}
MODES = {
    "offline": ["stop.max_steps=3", "inner.steps=40", "report.seeds=1"],
    "online": ["outer.mode=online", "task.cv_folds=0", "inner.steps=60", "outer.window=10",
               "report.seeds=1"],
}
INTERRUPTED_TASK = "mlp_digits"


def tasks() -> list[str]:
    """The built-in task names, as ``hyperdiff tasks`` lists them."""
    from hyperdiff.app.tasks import TASKS

    return list(TASKS)


SCRATCH = re.compile(re.escape(tempfile.gettempdir()) + r"/[^\s'\"`]+")
"""A path under a scratch folder of one recording or check (``tempfile``'s), as messages may
quote it (a run directory's name differs between a recorded and a resumed run)."""


def strip(value: Any) -> Any:
    """``value`` without timing fields and paths, at any depth; scratch folders quoted in
    strings (a warning naming its run directory) read ``<scratch>``, whole."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING and "time" not in k}
    if isinstance(value, list):
        return [strip(v) for v in value]
    if isinstance(value, str):
        return SCRATCH.sub("<scratch>", value)
    return value


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hyperdiff", "run", "-q", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800)


def outcome(run_dir: Path, proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """What a finished CLI run leaves: its stripped history and result, or its error line."""
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    history = [strip(json.loads(ln)) for ln in (run_dir / "history.jsonl").read_text().splitlines()
               if ln.strip()]
    result = strip(json.loads((run_dir / "result.json").read_text()))
    return {"history": history, "result": result}


def settings(task: str, mode: str) -> list[str]:
    return ["--task", task, *[x for s in MODES[mode] for x in ("--set", s)]]


def interrupt_after(run_dir: Path, args: list[str], cwd: Path, lines: int) -> None:
    """Start ``hyperdiff run`` and send it SIGINT once its history has ``lines`` lines."""
    proc = subprocess.Popen([sys.executable, "-m", "hyperdiff", "run", "-q", *args,
                             "--out", str(run_dir)], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    history = run_dir / "history.jsonl"
    deadline = time.monotonic() + 1800
    while proc.poll() is None and time.monotonic() < deadline:
        if history.exists() and len(history.read_text().splitlines()) >= lines:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    proc.wait(timeout=600)


def record(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    golden: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for mode in MODES:
            for task in tasks():
                run_dir = work / f"{task}-{mode}"
                proc = run_cli([*settings(task, mode), "--out", str(run_dir)], work)
                golden[f"{task}/{mode}"] = outcome(run_dir, proc)
                print(f"recorded {task}/{mode}", golden[f"{task}/{mode}"].get("error", ""))
            stopped = folder / f"interrupted-{mode}"
            shutil.rmtree(stopped, ignore_errors=True)
            interrupt_after(stopped, settings(INTERRUPTED_TASK, mode), work, lines=2)
            print(f"interrupted {INTERRUPTED_TASK}/{mode} after "
                  f"{len((stopped / 'history.jsonl').read_text().splitlines())} steps")
    (folder / "golden.json").write_text(json.dumps(golden, indent=1, sort_keys=True))


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}.{key}: only in {'after' if key in b else 'before'}"
            found = first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} entries != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if repr(a) == repr(b) else f"{where}: {a!r} != {b!r}"


def check(folder: Path) -> int:
    golden = strip(json.loads((folder / "golden.json").read_text()))
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for case, expected in golden.items():
            task, mode = case.split("/")
            run_dir = work / f"{task}-{mode}"
            found = first_difference(expected, outcome(run_dir, run_cli(
                [*settings(task, mode), "--out", str(run_dir)], work)))
            failures += found is not None
            print(f"{'DIFFERS' if found else 'same   '} {case}{': ' + found if found else ''}")
        for mode in MODES:
            copy = work / f"resumed-{mode}"
            shutil.copytree(folder / f"interrupted-{mode}", copy, symlinks=True)
            found = first_difference(golden[f"{INTERRUPTED_TASK}/{mode}"],
                                     outcome(copy, run_cli(["--resume", str(copy)], work)))
            failures += found is not None
            print(f"{'DIFFERS' if found else 'same   '} resumed {INTERRUPTED_TASK}/{mode}"
                  f"{': ' + found if found else ''}")
    print(f"{failures} of {len(golden) + len(MODES)} cases differ")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.action == "record":
        record(args.folder.resolve())
        return 0
    return check(args.folder.resolve())


if __name__ == "__main__":
    sys.exit(main())
