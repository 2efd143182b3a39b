"""Reading ``history.jsonl``: one :class:`~hyperdiff.history.StepRecord` per line, checked.

Line ``i`` (1-based) must be a complete JSON record of outer step ``i - 1``. A damaged line
(invalid JSON, a missing or mistyped field) or a step index out of order (a duplicated line, a
line replaced by another step's, a removed line) is one :class:`HyperdiffError` that names the
file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HyperdiffError
from ..history import StepRecord

NEW_RUN = ("start a new run with the same config (`hyperdiff run RUN_DIR/config.toml --out "
           "NEW_DIR`): a run is deterministic and recomputes the same steps")
RECOVER = f"restore the file from a copy, or {NEW_RUN}"


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
    raise HyperdiffError(f"run directory: {path} line {number} is {what}; {RECOVER}")


def parse_records(lines: list[str], path: Path) -> list[StepRecord]:
    """Records of ``lines``; line ``i`` must hold outer step ``i - 1``."""
    records = []
    for index, line in enumerate(lines):
        record = parse_line(line, path, index + 1)
        if record.step != index:
            raise HyperdiffError(
                f"run directory: {path} line {index + 1} holds step {record.step} where step "
                f"{index} belongs (a line was duplicated, removed or replaced by another "
                f"step's); {RECOVER}"
            )
        records.append(record)
    return records
