"""The run directory: config, append-only JSONL history, atomic checkpoints, final result.

Layout of ``RUN_DIR`` (see ``docs/run_directory.md``)::

    config.toml      the resolved config (every key), written when the run starts
    hparams.json     the hyperparameters: kind, constraint (and its settings), coordinate names
    history.jsonl    one StepRecord per line, appended after every outer step (fsynced before
                     each checkpoint and the result: only lines a checkpoint covers must
                     survive a power loss; the others are recomputed on resume)
    checkpoint.pt    the driver's state_dict (torch.save), replaced atomically
    manifest.json    sha256 of config.toml, hparams.json, the last checkpoints and the history
                     they cover (see :mod:`hyperdiff.app.rundir.manifest`)
    result.json      the final result and report, written when the run ends
    run.lock         locked by the process that runs or resumes the run (see .lock)
    figures/*.png    written by ``hyperdiff plot RUN_DIR``

A run killed at any moment resumes exactly: the checkpoint says how many steps it covers,
the history is cut back to that many lines (a step logged after the last checkpoint is
recomputed, identically), and the driver continues from the saved state. A resume first
verifies every file against the manifest and refuses, saying what is damaged, instead of
continuing from a wrong state.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hyperdiff.app.rundir.files import (
    COPY_ADVICE,
    append_bytes,
    atomic_write_bytes,
    fs_error,
    hard_link_error,
    read_bytes,
    read_text,
    refuse_link,
    remove_temporaries,
    run_again,
    sync_file,
)
from hyperdiff.app.rundir.lock import RunLock
from hyperdiff.app.rundir.manifest import Manifest, sha256
from hyperdiff.app.rundir.records import (
    MANIFEST,
    new_run,
    parse_line,
    parse_records,
    recover,
    shell_path,
    split_lines,
)
from hyperdiff.errors import HyperdiffError
from hyperdiff.hparams.hyperparams import HyperParameters
from hyperdiff.tuner.history import StepRecord

CONFIG, HISTORY, CHECKPOINT, RESULT = "config.toml", "history.jsonl", "checkpoint.pt", "result.json"
HPARAMS, LOCK, FIGURES = "hparams.json", "run.lock", "figures"
RUN_FILES = (CONFIG, HPARAMS, HISTORY, CHECKPOINT, MANIFEST, RESULT)
"""The files that make a directory a run directory (``run.lock`` alone does not)."""
CHECKSUMMED = (CONFIG, HPARAMS)

LOGGER = logging.getLogger("hyperdiff.rundir")


def _in_the_way(path: Path) -> str:
    """What keeps ``path`` from being made as a directory: it, or the first of its parents,
    as an existing file or a symbolic link to a missing target."""
    for where in (path, *path.parents):
        if where.is_symlink() and not where.exists():
            return f"{where}, a symbolic link to a missing target"
        if where.exists() and not where.is_dir():
            return f"{where}, an existing file"
    return f"{path}, an existing file"


class RunDir:
    """Files of one run (see the module doc).

    A new run: ``RunDir.create(path)`` or ``RunDir.create_unique(parent, stem)``, then
    ``with rundir.lock(): rundir.refuse_existing_run(); rundir.start(...)``. A resume:
    ``RunDir.existing(path)``, then under ``lock()``: :meth:`config_path` (verifies the start
    files), :meth:`load_checkpoint`, :meth:`load_history`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.created = False
        self.started_here = False  # start() wrote this run's files in this process
        self.resuming = False  # opened by :meth:`existing`: a run to resume
        self._lock = RunLock(self.path / LOCK)
        self._manifest: Manifest | None = None
        self._entry: dict[str, Any] | None = None
        self._history_digest = hashlib.sha256()
        self._history_steps: int | None = None
        self._history_unsynced = False

    def __getstate__(self) -> dict[str, Any]:
        """Picklable state (torch.distributed sends rank 0's RunDir to the other ranks): the
        running history digest is left out; a copy recomputes it from the file if asked."""
        state = dict(vars(self))
        state["_history_digest"], state["_history_steps"] = None, None
        state["_history_unsynced"] = False  # the copy appends nothing
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._history_digest = hashlib.sha256()

    # ------------------------------------------------------------------ creating, locking
    @classmethod
    def create(cls, path: str | Path) -> RunDir:
        """The directory ``path`` for a new run, made (with its parents) if missing.

        An existing directory is used only if it holds no run: call
        :meth:`refuse_existing_run` under :meth:`lock`.
        """
        rundir = cls(path)
        try:
            rundir.path.mkdir(parents=True)
            rundir.created = True
        except FileExistsError:
            if not rundir.path.is_dir():
                raise HyperdiffError(f"run: the run directory {rundir.path} (--out or "
                                     f"output.dir) must be a directory or a new path (got "
                                     f"{_in_the_way(rundir.path)}); choose another "
                                     "one") from None
        except OSError as err:
            raise fs_error(rundir.path, "create the run directory", err) from None
        return rundir

    @classmethod
    def create_unique(cls, parent: str | Path, stem: str) -> RunDir:
        """A new, empty directory ``parent/stem``, or ``parent/stem-2``, ``-3``, ... if taken.

        ``os.mkdir`` is atomic: of two processes asking for the same name, one gets it and the
        other moves on to the next suffix.
        """
        parent = Path(parent)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise HyperdiffError(
                f"run: {parent}, the directory of new runs (without --out or output.dir), "
                f"must be a directory or a new path (got {_in_the_way(parent)}); remove or "
                "rename it, or give the run directory with --out") from None
        except OSError as err:
            raise fs_error(parent, "create the directory", err) from None
        for number in itertools.count(1):
            path = parent / (stem if number == 1 else f"{stem}-{number}")
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            except OSError as err:
                raise fs_error(path, "create the run directory", err) from None
            rundir = cls(path)
            rundir.created = True
            return rundir
        raise AssertionError("unreachable")  # pragma: no cover

    @classmethod
    def existing(cls, path: str | Path) -> RunDir:
        """The directory of a run to resume; raises if it holds none."""
        rundir = cls(path)
        rundir.config_file_exists()
        rundir.resuming = True
        return rundir

    @contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold the run directory's OS lock (see :mod:`hyperdiff.app.rundir.lock`) for the block.

        Temporary files that a killed run left behind are removed once the lock is held.
        """
        if not self.path.is_dir():
            raise HyperdiffError(f"run directory: {self.path} does not exist or is not a "
                                 "directory, so it holds no run")
        with self._lock:
            for path in remove_temporaries(self.path, RUN_FILES):
                LOGGER.info("removed %s, left behind by an interrupted write", path)
            yield self

    def discard_if_unused(self) -> None:
        """Remove a directory that :meth:`create` made when no run file was written to it."""
        if not self.created or self.has_run():
            return
        with suppress(OSError):
            (self.path / LOCK).unlink(missing_ok=True)
            self.path.rmdir()

    def discard_unstarted(self) -> None:
        """Remove the files of a run that :meth:`start` began in this process and that recorded
        no outer step (refused before its first training ended: nothing was computed), so that
        the corrected command can use the same directory; and the directory, if :meth:`create`
        made it and nothing else was written there. A resumed run's files are kept (a run
        stopped before its first checkpoint starts over with :meth:`start`, but its files were
        not this process's to remove: they are what a later --resume continues)."""
        if not self.started_here or self.resuming or self._history_steps != 0:
            return
        for name in (*RUN_FILES, LOCK):
            with suppress(FileNotFoundError):
                self.file(name).unlink()
        self.started_here = False
        if self.created:
            with suppress(OSError):
                self.path.rmdir()

    # ------------------------------------------------------------------ state of the directory
    def file(self, name: str) -> Path:
        return self.path / name

    def has_run(self) -> bool:
        """True when a run was started here (any of :data:`RUN_FILES` exists)."""
        return bool(self._present(RUN_FILES))

    def _present(self, names: tuple[str, ...]) -> list[str]:
        return [n for n in names if self._exists(n)]

    def interrupted_start(self) -> bool:
        """Whether the directory holds what :meth:`start` writes before its manifest (which
        it writes last: ``hparams.json``, an empty ``history.jsonl``, maybe ``config.toml``)
        and nothing else of a run: a run stopped while its start files were written, which
        computed nothing. (A lone file of those names is someone else's: refused.)"""
        history = self.file(HISTORY)
        return (self._exists(HPARAMS) and not history.is_symlink() and history.is_file()
                and history.stat().st_size == 0
                and not self._present((MANIFEST, CHECKPOINT, RESULT)))

    def refuse_existing_run(self) -> None:
        """Raise if the directory holds another run's files (call it under :meth:`lock`); the
        files of a start that was stopped before its manifest are removed instead."""
        if self.interrupted_start():
            for name in (CONFIG, HPARAMS, HISTORY):
                with suppress(FileNotFoundError):
                    self.file(name).unlink()
            LOGGER.info("%s: removed the start files of a run stopped while they were "
                        "written (it recorded no step)", self.path)
        found = self._present(RUN_FILES)
        if found:
            raise HyperdiffError(
                f"run: the run directory {self.path} already holds a run ({', '.join(found)}); "
                "continue it with --resume, or choose another directory with --out"
            )

    def config_file_exists(self) -> None:
        if self.interrupted_start():
            raise HyperdiffError(
                f"run directory: {self.path} holds a run that was stopped while its start "
                "files were written, before its first step: there is nothing to resume; start "
                f"it again with the same command and --out {shell_path(self.path)}")
        if not self._exists(CONFIG):
            raise HyperdiffError(f"run directory: {self.file(CONFIG)} does not exist, so "
                                 f"{self.path} holds no run (to resume, or to start from)")

    def start(self, config_toml: str, hparams: HyperParameters,
              inputs: dict[str, Any] | None = None,
              start_from: dict[str, Any] | None = None) -> None:
        """Write the hyperparameters, an empty history, the config and the manifest (with the
        fingerprints ``inputs`` of the task's code and data, and the values ``--from`` starts
        the run at, in the same write: a run stopped before its first step resumes at them).
        A write that fails (a full disk)
        removes the files this call created, so the same command can use the directory again
        (a stop, which cannot clean up, is recognised by :meth:`interrupted_start`)."""
        files = {HPARAMS: json.dumps(describe(hparams), indent=1).encode(),
                 HISTORY: b"", CONFIG: config_toml.encode()}
        new = [n for n in (*files, MANIFEST) if not self._exists(n)]
        try:
            for name, data in files.items():
                atomic_write_bytes(self.file(name), data)
            self._write_manifest(Manifest({n: sha256(files[n]) for n in CHECKSUMMED},
                                          inputs=inputs, start_from=start_from))
        except HyperdiffError as err:  # e.g. a full disk: what it wrote is removed again
            self._remove(new)
            self._manifest = None
            raise (run_again(err) if len(new) == len(files) + 1 else err) from None
        self._history_digest, self._history_steps = hashlib.sha256(), 0
        self.started_here = True

    def _remove(self, names: list[str]) -> None:
        """Delete the run files ``names`` where they exist (best effort)."""
        for name in names:
            with suppress(OSError):
                self.file(name).unlink()

    @contextmanager
    def _first_step(self) -> Iterator[None]:
        """A write of a new run that has recorded no step yet: on an error the run is
        discarded (:meth:`discard_unstarted`), so the advice is to run the command again."""
        unstarted = self.started_here and self._history_steps == 0 and not self.resuming
        try:
            yield
        except HyperdiffError as err:
            if not unstarted:
                raise
            raise run_again(err) from None

    def config_path(self) -> Path:
        """Path of the run's config, after verifying the start files against the manifest.

        Raises:
            HyperdiffError: no run here, a run file is a symbolic link, the manifest is
                missing or damaged, or config.toml / hparams.json were changed.
        """
        self.config_file_exists()
        for name in self._present(RUN_FILES):
            refuse_link(self.file(name))
        manifest = self._require_manifest()
        for name in CHECKSUMMED:
            expected = manifest.files.get(name)
            actual = sha256(read_bytes(self.file(name)))
            if name == CONFIG and actual != expected and self._undo_extension(manifest, actual):
                continue
            if expected is not None and actual != expected:
                other = (f"start a new run with the changed file (`hyperdiff run "
                         f"{shell_path(self.file(CONFIG))} --out NEW_DIR`)" if name == CONFIG
                         else "change the hyperparameters in the task (a run writes "
                         f"{HPARAMS} to describe them, never reads it) and start a new run")
                raise HyperdiffError(
                    f"run directory: {self.file(name)} was changed after the run started (its "
                    f"sha256 differs from the one in {MANIFEST}); restore the original, or "
                    f"{other}"
                )
        return self.file(CONFIG)

    def _undo_extension(self, manifest: Manifest, actual: str) -> bool:
        """Take back the manifest's last extension when the config on disk is the one it
        replaced (a kill between the two writes of :meth:`extend`): the run is as before it,
        and the same command extends it again. True when undone."""
        last = manifest.extensions[-1] if manifest.extensions else None
        if last is None or last.get("config_sha256_before") != actual:
            return False
        self._write_manifest(replace(manifest, files={**manifest.files, CONFIG: actual},
                                     extensions=manifest.extensions[:-1]))
        LOGGER.warning("%s: its extension to %s outer steps was stopped before the config was "
                       "written, so it was taken back; extend the run again", self.path,
                       last.get("to_max_steps"))
        return True

    def recorded_inputs(self) -> dict[str, Any] | None:
        """The fingerprints of the task's code and data that the manifest records (``None``
        for a run written before hyperdiff recorded them)."""
        return self._require_manifest().inputs

    def record_inputs(self, inputs: dict[str, Any], change: dict[str, Any] | None = None
                      ) -> None:
        """Record ``inputs`` in the manifest, and ``change`` (what a resume accepted)."""
        with self._first_step():
            self._write_manifest(self._require_manifest().with_inputs(inputs, change))

    def extend(self, config_toml: str, old_steps: int, new_steps: int) -> None:
        """Replace the config with ``config_toml`` (the step budget ``old_steps`` raised to
        ``new_steps``) and record the extension, at the last checkpoint's step, in the
        manifest."""
        data = config_toml.encode()
        manifest = self._require_manifest()
        step = manifest.checkpoints[-1]["step"] if manifest.checkpoints else 0
        extension = {"step": step, "from_max_steps": old_steps, "to_max_steps": new_steps,
                     "config_sha256_before": manifest.files.get(CONFIG)}
        # the manifest first: a kill before the config lands leaves the old config, which
        # :meth:`config_path` recognises by this entry and takes back (the extension undone)
        self._write_manifest(manifest.with_extension(CONFIG, sha256(data), extension))
        atomic_write_bytes(self.file(CONFIG), data)

    def start_from(self) -> dict[str, Any] | None:
        """The values ``--from`` started this run at, or ``None``."""
        return self._require_manifest().start_from

    def extensions(self) -> list[dict[str, Any]]:
        """The budget extensions of this run, oldest first (``{"step", "from_max_steps",
        "to_max_steps"}``)."""
        return [{k: v for k, v in e.items() if k != "config_sha256_before"}
                for e in self._require_manifest().extensions]

    def input_changes(self) -> list[dict[str, Any]]:
        """The changed inputs that resumes of this run accepted, oldest first."""
        return list(self._require_manifest().input_changes)

    # ------------------------------------------------------------------ history
    def append(self, record: StepRecord) -> None:
        """Append one record to the history, handed to the operating system; it is fsynced
        by the next checkpoint or result (:meth:`sync_history`): a line after the last
        checkpoint is cut back and recomputed on resume, so only those before must be
        durable."""
        line = (record.to_json() + "\n").encode()
        with self._first_step():
            append_bytes(self.file(HISTORY), line, sync=False)
        self._history_unsynced = True
        self._history_digest.update(line)
        if self._history_steps is not None:
            self._history_steps += 1

    def load_history(self, steps: int) -> list[StepRecord]:
        """The first ``steps`` records, verified; the file is cut back to them (atomically).

        Raises:
            HyperdiffError: fewer lines than ``steps``, a damaged line, step indices other
                than ``0 .. steps-1``, or records that differ from those the checkpoint of
                ``steps`` was written with.
        """
        path = self.file(HISTORY)
        lines, rest = split_lines(read_text(path)) if self._exists(HISTORY) else ([], "")
        self._require_lines(lines, steps)
        kept = lines[:steps]
        records = parse_records(kept, path)
        digest = self._verify_digest(kept, self._entry)
        if len(lines) != steps or rest:
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
        elif self._exists(HISTORY):  # appended to in place: refused now, before a step is run
            links = os.lstat(path).st_nlink
            if links > 1:
                raise hard_link_error(path, "append to", links, COPY_ADVICE)
        self._history_digest, self._history_steps = digest, steps
        return records

    def _require_lines(self, lines: list[str], steps: int) -> None:
        """Raise unless the history's ``lines`` cover the checkpoint's ``steps``."""
        if len(lines) < steps:
            raise HyperdiffError(
                f"run directory: {self.file(HISTORY)} must hold at least {steps} steps to "
                f"resume from the checkpoint (got {len(lines)}); the history was edited or "
                f"lost: {recover(self.path)}"
            )

    def _verify_digest(self, kept: list[str], entry: dict[str, Any] | None) -> Any:
        """The sha256 object of the history lines ``kept``, after checking it against the
        checkpoint ``entry`` of the manifest (when it is of as many steps and lists one)."""
        steps = len(kept)
        digest = hashlib.sha256("".join(line + "\n" for line in kept).encode())
        if entry is not None and entry["step"] == steps and entry.get("history_sha256") and (
            digest.hexdigest() != entry["history_sha256"]
        ):
            raise HyperdiffError(
                f"run directory: {self.file(HISTORY)}: its first {steps} records differ from "
                f"those that {CHECKPOINT} was written with (a record was edited); "
                f"{recover(self.path)}"
            )
        return digest

    def read_history(self) -> list[StepRecord]:
        """Every record of the history file (for plots and reports).

        An unfinished last line (a run killed while writing it) is skipped with a warning, and
        blank lines at the end are skipped, as ``--resume`` would drop them; any other damage
        raises. :meth:`verify_history` checks the records as a resume does.
        """
        path = self.file(HISTORY)
        if not self._exists(HISTORY):
            raise HyperdiffError(f"run directory: {path} does not exist; is {self.path} a run "
                                 "directory made by `hyperdiff run`?")
        lines, rest = split_lines(read_text(path))
        if not rest.strip():  # blank lines at the end: --resume drops them too
            rest = ""
            while lines and not lines[-1].strip():
                lines.pop()
        records = parse_records(lines, path)
        if rest:
            try:
                last = parse_line(rest, path, len(lines) + 1)
            except HyperdiffError:
                last = None
            if last is not None and last.step == len(records):
                records.append(last)
            else:
                LOGGER.warning("%s: skipped the unfinished line %d (a run killed while writing "
                               "it; `hyperdiff run --resume` recomputes that step)", path,
                               len(lines) + 1)
        return records

    def verify_history(self, records: list[StepRecord]) -> list[StepRecord]:
        """``records`` (of :meth:`read_history`) checked as ``--resume`` checks the history:
        the lines that the checkpoint on disk covers must hash to the value the manifest lists
        for it. A finished run's records past its result's ``steps`` (not this run's: another
        process appended them) are left out with a warning."""
        manifest = self._manifest_to_verify()
        entry = None if manifest is None else self._checkpoint_on_disk(manifest)
        if entry is not None:
            lines, _ = split_lines(read_text(self.file(HISTORY)))
            self._require_lines(lines, entry["step"])
            self._verify_digest(lines[: entry["step"]], entry)
        return self._within_result(records, manifest)

    def _manifest_to_verify(self) -> Manifest | None:
        if self._exists(MANIFEST):
            return self._require_manifest()
        LOGGER.warning("%s is missing, so %s cannot be verified; it is read as it is",
                       self.file(MANIFEST), self.file(HISTORY))
        return None

    def _checkpoint_on_disk(self, manifest: Manifest) -> dict[str, Any] | None:
        """The manifest's entry of the checkpoint on disk (``None``: there is none)."""
        if not self._exists(CHECKPOINT):
            return None
        return self._listed(manifest, read_bytes(self.file(CHECKPOINT)))

    def _listed(self, manifest: Manifest, data: bytes) -> dict[str, Any]:
        """The manifest's entry of the checkpoint bytes ``data``; raises if none matches."""
        entry = manifest.checkpoint(sha256(data))
        if entry is None:
            raise HyperdiffError(
                f"run directory: {self.file(CHECKPOINT)} is damaged: its sha256 matches none of "
                f"the checkpoints recorded in {MANIFEST} (flipped bits, a truncated or a "
                f"replaced file). Restore it, or {new_run(self.path)}"
            )
        return entry

    def _within_result(self, records: list[StepRecord], manifest: Manifest | None
                       ) -> list[StepRecord]:
        """``records`` without those past a finished run's end (see :meth:`verify_history`)."""
        result = self.read_result()
        steps = None if result is None else result.get("steps")
        if (not isinstance(steps, int) or isinstance(steps, bool) or len(records) <= steps
                or _extension_pending(manifest, steps)):
            return records
        LOGGER.warning(
            "%s: lines %d-%d are past the end of the finished run (%s: %d steps), so they are "
            "not this run's (another process appended them, e.g. a resume of a copy made with "
            "hard links): they are left out", self.file(HISTORY), steps + 1, len(records),
            RESULT, steps)
        return records[:steps]

    def sync_history(self) -> None:
        """fsync the history's appended lines, if any are not yet."""
        if self._history_unsynced:
            sync_file(self.file(HISTORY))
            self._history_unsynced = False

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``state`` with torch.save, atomically, listed in the manifest first (after
        the history lines it covers are durable)."""
        self.sync_history()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        step = int(state.get("step", 0))
        manifest = self._manifest_or_empty()
        updated = manifest.with_checkpoint(sha256(data), step, self._history_sha(step),
                                           self._entry)
        with self._first_step():
            self._write_manifest(updated)
            # the manifest's rename is made durable first; losing this one keeps the old,
            # listed checkpoint, from which the run resumes exactly
            atomic_write_bytes(self.file(CHECKPOINT), data, sync_directory=False)
        self._entry = updated.checkpoints[-1]  # the file on disk now

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint, verified, or ``None`` if the run was killed before its first.

        Raises:
            HyperdiffError: the checkpoint is missing although the manifest records one, its
                sha256 is not in the manifest (damaged or replaced), or torch cannot read it
                (also when ``weights_only=True`` refuses it).
        """
        path = self.file(CHECKPOINT)
        manifest = self._require_manifest()
        if not self._exists(CHECKPOINT):
            if len(manifest.checkpoints) == 1:  # killed while its first one was written
                LOGGER.warning(
                    "%s: the run was stopped while it wrote its first checkpoint (of step %d), "
                    "so it starts over from step 0; its steps are computed again, identically",
                    self.path, manifest.checkpoints[0]["step"])
                return None
            if manifest.checkpoints:
                step = manifest.checkpoints[-1]["step"]
                raise HyperdiffError(
                    f"run directory: {path} is missing, but {MANIFEST} records a checkpoint of "
                    f"step {step}; continuing without it would discard the history. Restore "
                    f"it, or {new_run(self.path)}"
                )
            return None
        data = read_bytes(path)
        entry = self._listed(manifest, data)
        state = load_state(data, path)
        if not isinstance(state, dict) or state.get("step") != entry["step"]:
            got = (f"step {state.get('step')!r}" if isinstance(state, dict)
                   else type(state).__name__)
            raise HyperdiffError(f"run directory: {path} must hold a driver state of step "
                                 f"{entry['step']} (got {got}); {recover(self.path)}")
        self._entry = entry
        return state

    # ------------------------------------------------------------------ result, hparams
    def write_result(self, result: dict[str, Any]) -> None:
        """Write ``result.json`` (a value that is not finite is written as ``null``), after
        the history is durable."""
        self.sync_history()
        data = json.dumps(json_safe(result), indent=2, allow_nan=False)
        atomic_write_bytes(self.file(RESULT), data.encode())

    def read_result(self) -> dict[str, Any] | None:
        if not self._exists(RESULT):
            return None
        return self._read_json(RESULT, "the run finished but its result file is damaged: "
                               "delete it and resume the run to write it again")

    def read_hparams(self) -> dict[str, Any]:
        """What :meth:`start` wrote about the hyperparameters (empty if missing)."""
        if not self._exists(HPARAMS):
            return {}
        return self._read_json(HPARAMS, "restore it, or delete it (figures then name "
                               "coordinates by index)")

    # ------------------------------------------------------------------ internals
    def _exists(self, name: str) -> bool:
        path = self.file(name)
        try:
            os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as err:  # e.g. a run directory that may not be read
            raise fs_error(path, "use", err) from None
        return True

    def _read_json(self, name: str, advice: str) -> dict[str, Any]:
        path = self.file(name)
        try:
            value = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise HyperdiffError(f"run directory: {path} is not valid JSON ({err.msg} at line "
                                 f"{err.lineno} column {err.colno}); {advice}") from None
        if not isinstance(value, dict):
            raise HyperdiffError(f"run directory: {path} must hold a JSON object (got "
                                 f"{type(value).__name__}); {advice}")
        return value

    def _require_manifest(self) -> Manifest:
        if self._manifest is None:
            path = self.file(MANIFEST)
            if not self._exists(MANIFEST):
                raise HyperdiffError(
                    f"run directory: {path} is missing, so the run's files cannot be verified "
                    f"(it was deleted, or {self.path} was written before hyperdiff kept "
                    f"manifests); {new_run(self.path)}"
                )
            self._manifest = Manifest.from_bytes(read_bytes(path), path)
        return self._manifest

    def _manifest_or_empty(self) -> Manifest:
        if self._manifest is None and not self._exists(MANIFEST):
            return Manifest()
        return self._require_manifest()

    def _write_manifest(self, manifest: Manifest) -> None:
        atomic_write_bytes(self.file(MANIFEST), manifest.to_bytes())
        self._manifest = manifest

    def _history_sha(self, steps: int) -> str | None:
        """sha256 of the first ``steps`` history lines (``None`` if there are fewer)."""
        if self._history_steps == steps:
            return self._history_digest.hexdigest()
        if not self._exists(HISTORY):
            return None
        lines, _ = split_lines(read_text(self.file(HISTORY)))
        if len(lines) < steps:
            return None
        return hashlib.sha256("".join(line + "\n" for line in lines[:steps]).encode()).hexdigest()


def _extension_pending(manifest: Manifest | None, steps: int) -> bool:
    """Whether the manifest records an extension of the run past a result of ``steps``
    (the result then predates it, and the history goes on)."""
    return manifest is not None and any(e["from_max_steps"] >= steps
                                        for e in manifest.extensions)


def load_state(data: bytes, path: Path) -> Any:
    """``torch.load(weights_only=True)`` of checkpoint bytes; a refusal is one clear error."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as err:
        said = [line.split("WeightsUnpickler error:", 1)[1].strip()
                for line in str(err).splitlines() if "WeightsUnpickler error:" in line]
        detail = f": {said[0].split('. ')[0][:160]}" if said and said[0] else ""
        raise HyperdiffError(
            f"run directory: torch.load(weights_only=True) refused {path}{detail}. It is not a "
            "checkpoint that hyperdiff wrote (those hold only tensors and plain containers): "
            "it was damaged or replaced. Do not load it with weights_only=False unless you "
            f"trust where it came from; {recover(path.parent)}"
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, zipfile errors, ...
        text = str(err).strip()
        first = text.splitlines()[0].split(". ")[0][:160] if text else "no detail"
        raise HyperdiffError(
            f"run directory: torch.load cannot read {path} ({type(err).__name__}: {first}): "
            f"it is truncated or damaged; {recover(path.parent)}"
        ) from None


def json_safe(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def describe(hparams: HyperParameters) -> dict[str, Any]:
    """Kind, constraint (its name and settings: an interval's bounds, a positive transform),
    size and readable coordinate names of each hyperparameter. ``constraint_settings`` is
    recorded since s40: a description written before has none (not recorded)."""
    names = hparams.coordinate_names()
    out, start = {}, 0
    for name, spec in hparams.items():
        size = int(spec.init.numel())
        out[name] = {"kind": spec.kind, "constraint": spec.constraint.name,
                     "constraint_settings": spec.constraint.settings(), "size": size,
                     "coordinates": names[start : start + size]}
        start += size
    return out
