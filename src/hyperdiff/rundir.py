"""The run directory: config, append-only JSONL history, atomic checkpoints, final result.

Layout of ``RUN_DIR``::

    config.toml      the resolved config (every key), written when the run starts
    hparams.json     the hyperparameters: kind, constraint and coordinate names
    history.jsonl    one StepRecord per line, appended (and fsynced) after every outer step
    checkpoint.pt    the driver's state_dict, written to a temporary file and os.replace'd
    result.json      the final result and report, written when the run ends
    figures/*.png    written by ``hyperdiff plot RUN_DIR``

A run killed at any moment resumes exactly: the checkpoint says how many steps it covers,
the history is cut back to that many lines (a step logged after the last checkpoint is
recomputed, identically), and the driver continues from the saved state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import HyperdiffError
from .history import StepRecord
from .hyperparams import HyperParameters

CONFIG, HISTORY, CHECKPOINT, RESULT = "config.toml", "history.jsonl", "checkpoint.pt", "result.json"
HPARAMS = "hparams.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunDir:
    """Files of one run (see the module doc)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def has_run(self) -> bool:
        """True when a run was started here (a config or a history exists)."""
        return self.file(CONFIG).exists() or self.file(HISTORY).exists()

    def start(self, config_toml: str, hparams: HyperParameters) -> None:
        """Create the directory, write the config, the hyperparameters, an empty history."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.file(CONFIG), config_toml.encode())
        atomic_write_bytes(self.file(HPARAMS), json.dumps(describe(hparams), indent=1).encode())
        atomic_write_bytes(self.file(HISTORY), b"")

    def config_path(self) -> Path:
        """Path of the run's config; raises if there is none (no run here)."""
        if not self.file(CONFIG).exists():
            raise HyperdiffError(f"run directory: {self.file(CONFIG)} does not exist, so "
                                 f"{self.path} holds no run to resume")
        return self.file(CONFIG)

    def append(self, record: StepRecord) -> None:
        """Append one record to the history and flush it to disk."""
        with open(self.file(HISTORY), "a") as handle:
            handle.write(record.to_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``state`` with torch.save, atomically."""
        tmp = self.file(CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.file(CHECKPOINT))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint, or ``None`` if the run was killed before its first one."""
        if not self.file(CHECKPOINT).exists():
            return None
        return torch.load(self.file(CHECKPOINT), weights_only=True)

    def load_history(self, steps: int) -> list[StepRecord]:
        """The first ``steps`` records; the file is cut back to them (atomically)."""
        path = self.file(HISTORY)
        lines = path.read_text().splitlines() if path.exists() else []
        complete = [line for line in lines[:steps] if line.strip()]
        if len(complete) < steps:
            raise HyperdiffError(
                f"run directory: {path} must hold at least {steps} steps to resume from the "
                f"checkpoint (got {len(complete)}); the history was edited or lost"
            )
        if len(lines) != steps:
            atomic_write_bytes(path, "".join(line + "\n" for line in complete).encode())
        return [StepRecord.from_json(line) for line in complete]

    def read_history(self) -> list[StepRecord]:
        """Every record of the history file (for plots and reports)."""
        path = self.file(HISTORY)
        if not path.exists():
            raise HyperdiffError(f"run directory: {path} does not exist; is {self.path} a run "
                                 "directory made by `hyperdiff run`?")
        return [StepRecord.from_json(line) for line in path.read_text().splitlines() if line]

    def write_result(self, result: dict[str, Any]) -> None:
        atomic_write_bytes(self.file(RESULT), json.dumps(result, indent=2).encode())

    def read_hparams(self) -> dict[str, Any]:
        """What :meth:`start` wrote about the hyperparameters (empty if missing)."""
        path = self.file(HPARAMS)
        return json.loads(path.read_text()) if path.exists() else {}

    def read_result(self) -> dict[str, Any] | None:
        path = self.file(RESULT)
        return json.loads(path.read_text()) if path.exists() else None


def describe(hparams: HyperParameters) -> dict[str, Any]:
    """Kind, constraint, size and readable coordinate names of each hyperparameter."""
    names = hparams.coordinate_names()
    out, start = {}, 0
    for name, spec in hparams.items():
        size = int(spec.init.numel())
        out[name] = {"kind": spec.kind, "constraint": spec.constraint.name, "size": size,
                     "coordinates": names[start : start + size]}
        start += size
    return out
