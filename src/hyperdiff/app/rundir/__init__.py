"""Run directories: layout and resume (:mod:`.directory`), the OS lock (:mod:`.lock`),
atomic files that never follow links (:mod:`.files`), checksums (:mod:`.manifest`) and the
checked history reader (:mod:`.records`). See ``docs/run_directory.md``."""

from hyperdiff.app.rundir.directory import (
    CHECKPOINT,
    CONFIG,
    FIGURES,
    HISTORY,
    HPARAMS,
    LOCK,
    RESULT,
    RUN_FILES,
    RunDir,
    describe,
    json_safe,
    load_state,
)
from hyperdiff.app.rundir.files import atomic_write_bytes, read_bytes
from hyperdiff.app.rundir.lock import RunLock
from hyperdiff.app.rundir.manifest import Manifest
from hyperdiff.app.rundir.records import MANIFEST

__all__ = ["CHECKPOINT", "CONFIG", "FIGURES", "HISTORY", "HPARAMS", "LOCK", "MANIFEST", "RESULT",
           "RUN_FILES", "Manifest", "RunDir", "RunLock", "atomic_write_bytes", "describe",
           "json_safe", "load_state", "read_bytes"]
