"""Compare two benchmark result JSONs leaf by leaf: which numbers changed, how the timings moved.

A rerun of a benchmark (``benchmarks/*.py``) should reproduce its recorded numbers (losses,
hypergradient errors, iteration counts) exactly and its timings within the machine's noise.
This walks both files together and classes every numeric leaf by its path:

- a *timing* when a key on its path names a time or a machine measure (tokens such as ``s``,
  ``ms``, ``time``, ``wall``, ``cpu``, ``speedup``, ``ratio``, ``load``, ``rss``, keys starting
  with ``vs_`` or ending with ``per_step``; ``--timing-keys`` adds tokens): reported as the
  ratio new / old;
- a *number* otherwise: reported as identical or with its relative difference
  ``|new - old| / max(|old|, |new|)`` (0 when both are 0, NaN equals NaN).

Leaves that are not numbers (strings, booleans, null) are compared for equality, and paths found
in one file only are listed. Lists are compared position by position.

    python tools/compare_results.py benchmarks/results/implicit.json \\
        benchmarks/results/rerun/implicit.json [--timing-keys cost] [--rtol 1e-12] [--show 20]

Exit status 1 when a number (not a timing) differs by more than ``--rtol`` (default 0) or a
path is found in one file only, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Path_ = tuple[str | int, ...]

TIMING_TOKENS = frozenset({
    "s", "ms", "us", "sec", "secs", "second", "seconds", "time", "times", "wall", "cpu",
    "speedup", "ratio", "ratios", "share", "over", "load", "loadavg", "rss", "elapsed",
    "throughput",
})
"""Words of a key (split at anything but letters and digits) that make its leaves timings."""


def leaves(value: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Every leaf of a JSON value with its path of dict keys and list indices."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, (*path, index))
    else:
        yield path, value


def is_timing(path: Path_, extra: frozenset[str] = frozenset()) -> bool:
    """Whether a key on ``path`` names a time or machine measure (see :data:`TIMING_TOKENS`)."""
    for key in path:
        if not isinstance(key, str):
            continue
        name = key.lower()
        tokens = set(re.findall(r"[a-z0-9]+", name))
        if tokens & (TIMING_TOKENS | extra) or name.startswith("vs_") or name.endswith("per_step"):
            return True
    return False


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def relative_difference(old: float, new: float) -> float:
    """``|new - old| / max(|old|, |new|)``: 0 for equal values (NaN equals NaN), 1 across 0."""
    if old == new or (math.isnan(old) and math.isnan(new)):
        return 0.0
    if not (math.isfinite(old) and math.isfinite(new)):
        return math.inf
    return abs(new - old) / max(abs(old), abs(new))


def path_text(path: Path_) -> str:
    """``rows[3].test_loss`` for ``("rows", 3, "test_loss")``."""
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def compare(old: Any, new: Any, timing_keys: frozenset[str] = frozenset()) -> dict[str, list]:
    """Differences between two JSON values, by class.

    Returns a dict of lists: ``numbers`` (path, old, new, relative difference) for every
    non-timing numeric leaf present in both, ``timings`` (path, old, new, new / old) for every
    timing leaf present in both, ``other`` (path, old, new) for differing non-numeric leaves,
    ``only_old`` and ``only_new`` (paths found in one value only).
    """
    old_leaves, new_leaves = dict(leaves(old)), dict(leaves(new))
    report: dict[str, list] = {"numbers": [], "timings": [], "other": [],
                               "only_old": [p for p in old_leaves if p not in new_leaves],
                               "only_new": [p for p in new_leaves if p not in old_leaves]}
    for path, before in old_leaves.items():
        if path not in new_leaves:
            continue
        after = new_leaves[path]
        if is_number(before) and is_number(after):
            if is_timing(path, timing_keys):
                ratio = after / before if before else (math.nan if after else 1.0)
                report["timings"].append((path, before, after, ratio))
            else:
                report["numbers"].append((path, before, after,
                                          relative_difference(float(before), float(after))))
        elif before != after:
            report["other"].append((path, before, after))
    return report


def summary(report: dict[str, list], rtol: float = 0.0, show: int = 10) -> str:
    """A few lines: identical numbers, the largest differences, the timings' ratios."""
    numbers = report["numbers"]
    changed = sorted((row for row in numbers if row[3] > rtol), key=lambda row: -row[3])
    lines = [f"numbers: {len(numbers)}, {len(numbers) - len(changed)} identical"
             + (f" (within rtol {rtol:g})" if rtol else "") + f", {len(changed)} differ"]
    lines += [f"  {path_text(p)}: {a!r} -> {b!r} (rel {d:.3g})" for p, a, b, d in changed[:show]]
    ratios = [row[3] for row in report["timings"] if math.isfinite(row[3]) and row[3] > 0]
    if ratios:
        geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
        lines.append(f"timings: {len(report['timings'])}, new/old median "
                     f"{statistics.median(ratios):.3g}, geometric mean {geo:.3g}, "
                     f"range {min(ratios):.3g} .. {max(ratios):.3g}")
    else:
        lines.append(f"timings: {len(report['timings'])}")
    lines += [f"  other: {path_text(p)}: {a!r} -> {b!r}" for p, a, b in report["other"][:show]]
    for key in ("only_old", "only_new"):
        if report[key]:
            lines.append(f"{key}: {len(report[key])}: "
                         + ", ".join(path_text(p) for p in report[key][:show]))
    return "\n".join(lines)


def differs(report: dict[str, list], rtol: float = 0.0) -> bool:
    """Whether a number differs by more than ``rtol`` or a path is in one value only."""
    return (any(row[3] > rtol for row in report["numbers"])
            or bool(report["only_old"]) or bool(report["only_new"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--timing-keys", nargs="*", default=[],
                        help="more key words whose leaves are timings")
    parser.add_argument("--rtol", type=float, default=0.0,
                        help="relative difference of a number still counted as identical")
    parser.add_argument("--show", type=int, default=10, help="differences listed per class")
    args = parser.parse_args(argv)
    report = compare(json.loads(args.old.read_text()), json.loads(args.new.read_text()),
                     frozenset(key.lower() for key in args.timing_keys))
    print(summary(report, args.rtol, args.show))
    return int(differs(report, args.rtol))


if __name__ == "__main__":
    sys.exit(main())
