"""Record the suite's online rows, then check that a change keeps them bit for bit.

For an exact saving in the online loop (the same history, values and model): runs
``run_experiment`` with ``outer.mode = "online"`` on every suite task from its own start and
from ``--starts`` off (the suite's online row, its first report seed), and keeps each run's
``history.jsonl`` without its timing fields and the final checkpoint's tensors (parameters,
buffers, inner and outer optimizer states, tangents, raw values). ``record`` writes them;
``check`` runs the same again and compares every line and every tensor exactly
(``torch.equal`` and equal dtypes).

    PYTHONPATH=<old>/src python benchmarks/online_bitwise.py record /tmp/online_bits.pt
    python benchmarks/online_bitwise.py check /tmp/online_bits.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suite_tasks"))

from suite import SEEDS, TASK_DIR, TASKS, _load  # noqa: E402
from suite_common import start_name  # noqa: E402

from hyperdiff.app.config import load_config  # noqa: E402
from hyperdiff.app.experiment import run_experiment  # noqa: E402

TIMING = ("time_s", "step_time_s")


def tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint (dicts, lists, tuples), by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items: Any = (value.items() if isinstance(value, dict)
                  else enumerate(value) if isinstance(value, (list, tuple)) else ())
    out: dict[str, torch.Tensor] = {}
    for key, item in items:
        out.update(tensors(item, f"{prefix}/{key}"))
    return out


def one_run(ref: str, workdir: Path) -> dict[str, Any]:
    """The online row's history lines (no timing) and final checkpoint tensors."""
    overrides = [f"task.name={ref}", "outer.mode=online", f"outer.train_seed={SEEDS[0]}"]
    out = workdir / "run"
    run_experiment(load_config(overrides=overrides), out=out, progress=False,
                   log=lambda _message: None)
    lines = []
    for line in (out / "history.jsonl").read_text().splitlines():
        record = json.loads(line)
        lines.append(json.dumps({k: v for k, v in record.items() if k not in TIMING}))
    (checkpoint,) = [p for p in out.rglob("*.pt") if "checkpoint" in p.name]
    state = torch.load(checkpoint, weights_only=False)
    return {"history": lines, "tensors": tensors(state)}


def runs(starts: list[float]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in TASKS:
        has_lr = getattr(_load(TASK_DIR / f"{name}.py"), "LR_NAME", None) is not None
        for factor in [1.0, *(starts if has_lr else [])]:
            ref = f"{TASK_DIR / name}.py:{'build' if factor == 1.0 else start_name(factor)}"
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    out[f"{name} x{factor:g}"] = one_run(ref, Path(tmp))
                except Exception as err:  # a refused start: its message must stay the same
                    out[f"{name} x{factor:g}"] = {"error": str(err).splitlines()[-1]}
            print(f"{name} x{factor:g}: ran", flush=True)
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two runs' records (empty: bit for bit the same)."""
    if "error" in old or "error" in new:
        return [] if old.get("error") == new.get("error") else ["error"]
    diffs = [f"history line {i}" for i, (a, b) in
             enumerate(zip(old["history"], new["history"], strict=False)) if a != b]
    if len(old["history"]) != len(new["history"]):
        diffs.append("history length")
    for key in sorted(set(old["tensors"]) | set(new["tensors"])):
        a, b = old["tensors"].get(key), new["tensors"].get(key)
        if a is None or b is None or a.dtype != b.dtype or not torch.equal(a, b):
            diffs.append(f"tensor {key}")
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--starts", nargs="*", type=float, default=[0.1, 10.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    found = runs(args.starts)
    if args.action == "record":
        torch.save(found, args.path)
        return
    recorded = torch.load(args.path, weights_only=False)
    failed = 0
    for case, old in recorded.items():
        diffs = differences(old, found[case])
        failed += bool(diffs)
        lines = len(old.get("history", []))
        print(f"{case}: " + ("identical" if not diffs else "DIFFERS: " + ", ".join(diffs[:5]))
              + f" ({lines} history lines, {len(old.get('tensors', {}))} tensors)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
