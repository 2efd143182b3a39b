"""``manifest.json``: sha256 checksums that let a resume tell a sound run from a damaged one.

::

    {"format": 1,
     "files": {"config.toml": "<sha256>", "hparams.json": "<sha256>"},
     "checkpoints": [{"sha256": "<of checkpoint.pt>", "step": s,
                      "history_sha256": "<of the first s lines of history.jsonl>"}, ...],
     "inputs": {"task": {...}, "data": {"train": {...}, ...}},
     "input_changes": [{"step": s, "changes": ["..."]}, ...]}

``files`` is written when the run starts. Before ``checkpoint.pt`` is replaced, the manifest
is rewritten (atomically) to list the new checkpoint next to the current one (the one on
disk), so a run killed between the two writes still finds its checkpoint listed. A run killed
while writing its first checkpoint lists one that never landed and has none on disk: it starts
over (its steps are computed again, identically).
A resume accepts a checkpoint only if its sha256 is listed, and the history only if its first
``step`` lines hash to the recorded value. ``inputs`` are the fingerprints of the task's code
and data (:mod:`hyperdiff.app.tasks.inputs`), written when the run starts; a resume that accepted
changed inputs replaces them and appends what changed to ``input_changes``. Both are absent in
manifests written before hyperdiff recorded them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hyperdiff.app.rundir.records import new_run
from hyperdiff.errors import HyperdiffError

FORMAT = 1


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Manifest:
    """Checksums of the run's files (see the module doc)."""

    files: dict[str, str] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    inputs: dict[str, Any] | None = None
    input_changes: list[dict[str, Any]] = field(default_factory=list)
    extensions: list[dict[str, Any]] = field(default_factory=list)
    start_from: dict[str, Any] | None = None  # --from: {"run", "raw", "hparams"}

    def with_checkpoint(self, digest: str, step: int, history_digest: str | None,
                        on_disk: dict[str, Any] | None) -> Manifest:
        """A copy that lists a new checkpoint next to ``on_disk``, the entry of the file it
        replaces (``None``: there is none yet). An entry listed by a write that a kill cut
        short (its file never landed) is dropped: keeping it in place of the file on disk
        made the next interrupted write leave a checkpoint that no entry matched."""
        entry = {"sha256": digest, "step": step, "history_sha256": history_digest}
        kept = [] if on_disk is None or on_disk["sha256"] == digest else [on_disk]
        return replace(self, checkpoints=[*kept, entry])

    def with_inputs(self, inputs: dict[str, Any], change: dict[str, Any] | None) -> Manifest:
        """A copy that records ``inputs`` (and, if given, appends ``change``)."""
        changes = self.input_changes if change is None else [*self.input_changes, change]
        return replace(self, inputs=inputs, input_changes=changes)

    def with_extension(self, name: str, digest: str, extension: dict[str, Any]) -> Manifest:
        """A copy with file ``name``'s new checksum (the extended config) and ``extension``
        (``{"step", "from_max_steps", "to_max_steps"}``) appended."""
        return replace(self, files={**self.files, name: digest},
                       extensions=[*self.extensions, extension])

    def checkpoint(self, digest: str) -> dict[str, Any] | None:
        """The listed entry of the checkpoint with this sha256, or ``None``."""
        return next((c for c in self.checkpoints if c["sha256"] == digest), None)

    def to_bytes(self) -> bytes:
        raw: dict[str, Any] = {"format": FORMAT, "files": self.files,
                               "checkpoints": self.checkpoints}
        if self.inputs is not None:
            raw["inputs"] = self.inputs
        if self.input_changes:
            raw["input_changes"] = self.input_changes
        if self.extensions:
            raw["extensions"] = self.extensions
        if self.start_from is not None:
            raw["start_from"] = self.start_from
        return json.dumps(raw, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> Manifest:
        """Parse ``data``; a damaged manifest is a :class:`HyperdiffError` naming ``path``."""
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format must be {FORMAT} (got {raw.get('format')!r})")
            files, checkpoints = raw["files"], raw["checkpoints"]
            if not isinstance(files, dict) or not all(
                isinstance(v, str) for v in files.values()
            ):
                raise ValueError("'files' must map names to sha256 strings")
            if not _list_of(checkpoints, _checkpoint_entry):
                raise ValueError("'checkpoints' must be a list of {sha256, step, "
                                 "history_sha256}")
            inputs, changes = raw.get("inputs"), raw.get("input_changes", [])
            if inputs is not None and not (isinstance(inputs, dict) and all(
                    isinstance(v, dict) for v in inputs.values()) and all(
                    isinstance(v, dict) for v in (inputs.get("data") or {}).values())):
                raise ValueError("'inputs' must be an object of objects ('task', 'data': one "
                                 "object per split)")
            if inputs is not None and not _task_code(inputs.get("task", {})):
                raise ValueError("'inputs' 'task' of kind 'file' must have a 'path' and a "
                                 "'sha256' string")
            if not _list_of(changes, _input_change):
                raise ValueError("'input_changes' must be a list of {step, changes: [text]}")
            extensions, start_from = raw.get("extensions", []), raw.get("start_from")
            if not _list_of(extensions, _extension):
                raise ValueError("'extensions' must be a list of {step, from_max_steps, "
                                 "to_max_steps, ...}")
            if start_from is not None and not (isinstance(start_from, dict) and isinstance(
                    start_from.get("raw"), dict) and isinstance(start_from.get("hparams"), dict)):
                raise ValueError("'start_from' must be an object with 'raw' and 'hparams'")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise HyperdiffError(
                f"run directory: {path} is damaged ({type(err).__name__}: {err}); without it "
                f"the checkpoint cannot be verified: restore it, or {new_run(path.parent)}"
            ) from None
        return cls(files, checkpoints, inputs, changes, extensions, start_from)


def _list_of(value: Any, valid: Callable[[Any], bool]) -> bool:
    return isinstance(value, list) and all(valid(v) for v in value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checkpoint_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and _int(entry.get("step"))
            and isinstance(entry.get("history_sha256"), (str, type(None))))


def _task_code(task: dict[str, Any]) -> bool:
    """A file task names its file (a resume hashes it before importing it)."""
    return task.get("kind") != "file" or (isinstance(task.get("path"), str)
                                          and isinstance(task.get("sha256"), str))


def _input_change(change: Any) -> bool:
    return (isinstance(change, dict) and _int(change.get("step"))
            and _list_of(change.get("changes"), lambda c: isinstance(c, str)))


def _extension(extension: Any) -> bool:
    return isinstance(extension, dict) and all(
        _int(extension.get(key)) for key in ("step", "from_max_steps", "to_max_steps"))
