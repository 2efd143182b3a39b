"""Reading ``history.jsonl``: one :class:`~hyperdiff.tuner.history.StepRecord` per line, checked.

Line ``i`` (1-based) must be a complete JSON record of outer step ``i - 1``. A damaged line
(invalid JSON, a missing or mistyped field) or a step index out of order (a duplicated line, a
line replaced by another step's, a removed line) is one :class:`HyperdiffError` that names the
file and the line.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from hyperdiff.app.rundir.files import read_bytes
from hyperdiff.errors import HyperdiffError
from hyperdiff.tuner.history import StepRecord

MANIFEST = "manifest.json"


def shell_path(path: str | Path) -> str:
    """``path`` as a shell word, for commands in advice (quoted where it needs it)."""
    return shlex.quote(str(path))


def new_run(directory: Path) -> str:
    """What to do when a run directory cannot be continued: the same run, elsewhere (with
    ``--from`` the run it started from, as its manifest records it, where readable)."""
    source = recorded_start(directory)
    start = "" if source is None else f" --from {shell_path(source)}"
    return (f"start a new run with the same config (`hyperdiff run "
            f"{shell_path(directory / 'config.toml')}{start} --out NEW_DIR`): a run is "
            "deterministic and recomputes the same steps")


def recorded_start(directory: Path) -> str | None:
    """The run a run directory was started from (``--from``), read from its manifest, or
    ``None`` (none, or a manifest that cannot be read: the advice then omits it)."""
    try:  # without following a link or blocking on a FIFO, as every run file is read
        start = json.loads(read_bytes(directory / MANIFEST)).get("start_from")
        run = start.get("run") if isinstance(start, dict) else None
    except (HyperdiffError, ValueError, AttributeError):
        return None
    return run if isinstance(run, str) else None


def recover(directory: Path) -> str:
    return f"restore the file from a copy, or {new_run(directory)}"


def split_lines(text: str) -> tuple[list[str], str]:
    """The newline-terminated lines of ``text`` and the unterminated rest (``""`` if none)."""
    pieces = text.split("\n")
    return pieces[:-1], pieces[-1]


def parse_line(line: str, path: Path, number: int) -> StepRecord:
    """The record on line ``number`` (1-based) of ``path``."""
    try:
        return StepRecord.from_json(line)
    except json.JSONDecodeError as err:
        what = f"not valid JSON ({err.msg} at column {err.colno})"
    except ValueError as err:
        what = f"not a step record: {err}"
    raise HyperdiffError(f"run directory: {path} line {number} is {what}; {recover(path.parent)}")


def parse_records(lines: list[str], path: Path) -> list[StepRecord]:
    """Records of ``lines``; line ``i`` must hold outer step ``i - 1``."""
    records = []
    for index, line in enumerate(lines):
        record = parse_line(line, path, index + 1)
        if record.step != index:
            raise HyperdiffError(
                f"run directory: {path} line {index + 1} holds step {record.step} where step "
                f"{index} belongs (a line was duplicated, removed or replaced by another "
                f"step's); {recover(path.parent)}"
            )
        records.append(record)
    return records
