"""Files of a run directory: written atomically, read and appended without following links.

- :func:`atomic_write_bytes` writes a unique temporary file in the same directory, created
  exclusively (``O_CREAT | O_EXCL``, and ``O_NOFOLLOW`` where the platform has it), fsyncs
  it and ``os.replace``s it over the final name, so a reader sees the old file or the new one,
  never half of one, and a link planted at the temporary or the final name is never written
  through.
- :func:`read_bytes`, :func:`append_bytes` and :func:`sync_file` open with ``O_NOFOLLOW``: a
  symbolic link in a run directory is refused, not followed (a planted link could make a run
  read or overwrite a file outside its directory).
- :func:`append_bytes` and the lock (:mod:`.lock`), the writers that change a file in place,
  refuse a file with another hard link (:func:`refuse_hard_link`): writing it would change
  the other name's file too (a copy made with ``cp -al`` or ``rsync --link-dest``). An atomic
  write needs no such check: its rename gives the name a new file.
- every ``OSError`` becomes one :class:`~hyperdiff.errors.HyperdiffError` line through
  :func:`os_errors`: which file, what went wrong, what to do.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from hyperdiff.errors import HyperdiffError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
BINARY = getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
# opening a FIFO without it blocks until a writer comes: the file type is checked after the
# open (on the descriptor, so a swapped file cannot slip in), and a regular file ignores it
NONBLOCK = getattr(os, "O_NONBLOCK", 0)
TEMPORARY_SUFFIX = ".tmp"
NAME_MAX = 255  # bytes in a file name, on every common file system
TEMPORARY_EXTRA = len(f"..{'0' * 16}{TEMPORARY_SUFFIX}")  # what a temporary adds to a name

RESUME, AGAIN = "then resume the run", "then run the same command again"
ADVICE = {
    errno.ENOSPC: f"free some disk space, {RESUME}",
    errno.EDQUOT: f"the disk quota is used up: free some space, {RESUME}",
    errno.EFBIG: "the file is larger than this process may write (see `ulimit -f`)",
    errno.EROFS: "the file system is read-only: use a run directory on a writable one",
    errno.EACCES: "check the permissions (and immutable attributes, `lsattr`) of the file "
                  "and its directory",
    errno.EPERM: "check the permissions (and immutable attributes, `lsattr`) of the file "
                 "and its directory",
    errno.EISDIR: "a directory is in the way of the file: remove or rename it",
    errno.ENOTDIR: "a file is in the way of a directory: remove or rename it",
    errno.ELOOP: "a run directory must hold regular files, and a planted link could make a "
                 "run read or write outside it: replace the link by the file it points to",
    errno.ENOENT: "the file or its directory is missing",
}
REASONS = {errno.ELOOP: "it is a symbolic link"}


def fs_error(path: Path, action: str, err: OSError) -> HyperdiffError:
    """``"run directory: cannot <action> <path>: <what went wrong>; <what to do>"``."""
    code = err.errno if err.errno is not None else -1
    reason = REASONS.get(code) or err.strerror or str(err)
    advice = ADVICE.get(code, "check the file and its directory")
    return HyperdiffError(f"run directory: cannot {action} {path}: {reason}; {advice}")


def run_again(err: HyperdiffError) -> HyperdiffError:
    """``err`` with its advice to resume the run replaced by advice to run the same command
    again: for a new run that was discarded (nothing of it is left to resume)."""
    text = str(err)
    return HyperdiffError(text.replace(RESUME, AGAIN)) if RESUME in text else err


@contextmanager
def os_errors(path: Path, action: str) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into :func:`fs_error`."""
    try:
        yield
    except OSError as err:
        raise fs_error(path, action, err) from None


def refuse_link(path: Path) -> None:
    """Raise if ``path`` is a symbolic link (a clearer message than the ``ELOOP`` later)."""
    if path.is_symlink():
        raise fs_error(path, "use", OSError(errno.ELOOP, "symbolic link"))


def regular_file(fd: int, path: Path) -> None:
    """Raise unless the open ``fd`` is a regular file (not a directory, a FIFO, ...)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        raise fs_error(path, "read", OSError(errno.EISDIR, "it is a directory, not a file"))
    if not stat.S_ISREG(mode):
        raise HyperdiffError(f"run directory: cannot read {path}: it is not a regular file; "
                             "remove it")


def hard_link_error(path: Path, action: str, links: int, advice: str) -> HyperdiffError:
    """``"run directory: cannot <action> <path>: it is hard-linked ...; <advice>"``."""
    return HyperdiffError(
        f"run directory: cannot {action} {path}: it is hard-linked elsewhere ({links} names "
        f"share the file), so writing it here would change it there too; {advice}")


COPY_ADVICE = ("copy the run directory with `cp -r` rather than hard links (`cp -al`, "
               "`rsync --link-dest`) and use the copy")


def refuse_hard_link(fd: int, path: Path, action: str, advice: str = COPY_ADVICE) -> None:
    """Raise unless the open ``fd`` is the file's only name (see the module doc)."""
    links = os.fstat(fd).st_nlink
    if links > 1:
        raise hard_link_error(path, action, links, advice)


def read_bytes(path: Path) -> bytes:
    """The content of the regular file ``path`` (a link is refused)."""
    refuse_link(path)
    with os_errors(path, "read"):
        fd = os.open(path, os.O_RDONLY | NOFOLLOW | BINARY | NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            regular_file(handle.fileno(), path)
            return handle.read()


def read_text(path: Path) -> str:
    """:func:`read_bytes` decoded as UTF-8 (an error names the file)."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HyperdiffError(f"run directory: {path} is not UTF-8 text (byte {err.start}): it "
                             "was damaged or replaced; restore it from a copy") from None


def append_bytes(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Append ``data`` to the existing regular file ``path`` and fsync it (``sync=False``:
    hand it to the operating system only, which a killed process does not lose; a later
    :func:`sync_file` makes it durable against a power loss)."""
    refuse_link(path)
    with os_errors(path, "append to"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | NOFOLLOW | BINARY | NONBLOCK)
        with os.fdopen(fd, "ab") as handle:
            regular_file(handle.fileno(), path)
            refuse_hard_link(handle.fileno(), path, "append to")
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())


def sync_file(path: Path) -> None:
    """fsync the existing regular file ``path`` (what :func:`append_bytes` appended unsynced)."""
    refuse_link(path)
    with os_errors(path, "append to"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | NOFOLLOW | BINARY | NONBLOCK)
        try:
            regular_file(fd, path)
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, sync_directory: bool = True) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old or the new file, never half.

    The temporary file ``.<name>.<random>.tmp`` (:func:`temporary_prefix`) is created
    exclusively next to ``path``; it is removed again if anything fails. ``sync_directory``:
    fsync the directory after the rename, so that the new file survives a power loss before
    any later write (skip it where losing the rename only means falling back to the old file).
    """
    refuse_link(path)
    with os_errors(path, "write"):
        fd, tmp = _exclusive_temporary(path)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
    if sync_directory:
        fsync_directory(path.parent)


def temporary_prefix(name: str) -> str:
    """``".<name>."``, the start of the temporary files of ``name``; for a name too long to
    take the random part and the suffix within a file name's 255 bytes, ``".<sha256>."``
    (of ``name``: the same name always has the same prefix)."""
    if len(os.fsencode(name)) + TEMPORARY_EXTRA <= NAME_MAX:
        return f".{name}."
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:32]}."


def _exclusive_temporary(path: Path) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | BINARY
    prefix = temporary_prefix(path.name)
    while True:
        tmp = path.with_name(f"{prefix}{secrets.token_hex(8)}{TEMPORARY_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o644), tmp
        except FileExistsError:
            continue


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort; not every platform can)."""
    with suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_temporaries(directory: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete ``.<name>.*.tmp`` files (see :func:`temporary_prefix`) that a killed run left
    behind; return them."""
    prefixes = tuple(temporary_prefix(name) for name in names)
    removed = []
    with os_errors(directory, "list"):
        entries = list(os.scandir(directory))
    for entry in entries:
        if entry.name.endswith(TEMPORARY_SUFFIX) and entry.name.startswith(prefixes):
            with os_errors(Path(entry.path), "remove"):
                os.unlink(entry.path)  # unlinks a link itself, never its target
            removed.append(Path(entry.path))
    return removed
