"""Where a run may write: paths a config names stay inside, and apart from, the run's files.

- :func:`inside_run_dir`: a path from a config (``[log] csv``, ``[log] tensorboard``) is
  relative to the run directory, has no ``..`` and does not start with a run file's name, so
  a stored config can never make a resume write outside its directory or over its history.
- :func:`below_working_dir`: ``output.dir`` from a config file is relative without ``..``
  and does not start with ``~`` (which no shell expands there); a directory anywhere else is
  given on the command line (``--out``).
- :func:`make_directories`: create ``root/a/b`` one level at a time, refusing a symbolic
  link at every level, so that a planted link cannot redirect what is written below it.
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from pathlib import Path, PurePath

from hyperdiff.app.rundir.directory import FIGURES, LOCK, RUN_FILES
from hyperdiff.app.rundir.files import TEMPORARY_SUFFIX, fs_error, os_errors
from hyperdiff.errors import HyperdiffError

RESERVED = (*RUN_FILES, LOCK, FIGURES)
"""Names at the top of a run directory that belong to the run (``figures`` is a folder)."""


def _escape(value: str) -> str | None:
    """What makes ``value`` leave the directory it is relative to, or ``None``."""
    if "\0" in value:  # no file system takes it: refused here, not by os.open later
        return "a NUL character"
    path = PurePath(value)
    if path.is_absolute() or path.anchor:
        return "an absolute path"
    if ".." in path.parts:
        return "a path with '..'"
    return None


def inside_run_dir(value: str, where: str) -> PurePath:
    """``value`` as a path relative to the run directory, without ``..``.

    Raises:
        HyperdiffError: ``value`` is empty or ``.``, absolute, contains ``..``, or its first
            part is a run file, ``figures`` or a run file's temporary
            (``.history.jsonl.<hex>.tmp``); the message names ``where`` and ``value``.

    >>> inside_run_dir("logs/steps.csv", "config: log.csv").parts
    ('logs', 'steps.csv')
    """
    valid = ("a path inside the run directory (relative, without '..', not a run file such "
             f"as {', '.join(RESERVED)})")
    escape = _escape(value)
    path = PurePath(value)
    if escape or not path.parts:
        what = escape or "the run directory itself"
        raise HyperdiffError(f"{where} must be {valid} (got {value!r}: {what})")
    first = path.parts[0].casefold()  # history.JSONL is history.jsonl on macOS and Windows
    for name in RESERVED:
        name = name.casefold()
        if first == name or (first.startswith(f".{name}.") and first.endswith(TEMPORARY_SUFFIX)):
            raise HyperdiffError(f"{where} must be {valid} (got {value!r}: it would "
                                 f"overwrite or mix with the run's {path.parts[0]}); choose "
                                 "another name, e.g. 'steps.csv' or 'tensorboard'")
    return path


def below_working_dir(value: str, where: str) -> Path:
    """``value`` (a directory from a config file) as a relative path without ``..``.

    Raises:
        HyperdiffError: ``value`` is absolute, contains ``..`` or starts with ``~``; a
            directory outside the working directory is given on the command line with
            ``--out``.
    """
    escape = _escape(value)
    if escape:
        raise HyperdiffError(
            f"{where} must be a relative path without '..' (got {value!r}: {escape}); a "
            "config cannot send a run outside the working directory: give that directory "
            "on the command line with --out"
        )
    if value.startswith("~"):  # no shell expands it here: it would make a directory '~'
        raise HyperdiffError(
            f"{where} must be a relative path that does not start with '~' (got {value!r}: "
            "a home directory, which a config does not expand); give a directory in your "
            "home on the command line with --out (e.g. --out ~/runs), where the shell "
            "expands '~'"
        )
    return Path(value)


def make_directories(root: Path, relative: PurePath) -> Path:
    """Create ``root / relative`` one level at a time; a symbolic link at any level is refused.

    ``root`` itself (the run directory) may be a link. Returns ``root / relative``.
    """
    path = root
    for part in relative.parts:
        path = path / part
        with os_errors(path, "create the directory"), suppress(FileExistsError):
            os.mkdir(path)
        if path.is_symlink():
            raise fs_error(path, "use", OSError(errno.ELOOP, "symbolic link"))
        if not path.is_dir():
            raise fs_error(path, "use", OSError(errno.ENOTDIR, "it is a file, not a directory"))
    return path
