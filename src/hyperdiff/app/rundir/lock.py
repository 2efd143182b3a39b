"""An exclusive OS lock on a run directory, held for a whole run or resume.

``RUN_DIR/run.lock`` is locked with ``fcntl.flock(LOCK_EX | LOCK_NB)`` (``msvcrt.locking`` on
Windows). The operating system releases the lock when the process ends, however it ends
(``kill -9`` included), so a lock is never stale. The holder writes its pid, host and start
time into the file, and a second process that finds the directory locked gets one error that
names the holder. On a platform with neither, the run goes on unlocked after a warning. A
lock file with another hard link is refused, not written: writing it would change the other
name's file too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hyperdiff.app.rundir.files import BINARY, NOFOLLOW, os_errors, refuse_hard_link, refuse_link
from hyperdiff.app.rundir.records import shell_path
from hyperdiff.errors import HyperdiffError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOGGER = logging.getLogger("hyperdiff.rundir")


class RunLock:
    """``with RunLock(path): ...`` holds an exclusive lock on the file ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise a :class:`HyperdiffError` that names the holder."""
        if self._fd is not None:
            raise HyperdiffError(f"run directory: {self.path} is already locked by this object")
        refuse_link(self.path)
        with os_errors(self.path, "create the lock file"):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW | BINARY, 0o644)
        try:
            refuse_hard_link(fd, self.path, "lock", self._advice())
            if not _try_lock(fd, self.path):
                holder = _holder(fd)
                raise HyperdiffError(
                    f"run directory: {self.path.parent} is in use by another hyperdiff "
                    f"process ({holder}); wait for it to finish or stop it, then try again "
                    "(the lock goes away with its process)"
                )
            with os_errors(self.path, "write the lock file"):
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(holder_info()).encode())
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _advice(self) -> str:
        """What to do with a hard-linked lock file (writing it would change the other)."""
        return (f"remove it (`rm {shell_path(self.path)}`: a run makes a new one); if "
                f"{shell_path(self.path.parent)} is a copy made with hard links (`cp -al`, "
                "`rsync --link-dest`), copy the original with `cp -r` instead and use that copy")

    def release(self) -> None:
        """Empty the lock file and unlock it (the file stays: deleting it would race)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            _unlock(fd)
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holder_info() -> dict[str, Any]:
    """What the holder writes into the lock file."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it is just starting"


def _try_lock(fd: int, path: Path) -> bool:
    """Lock ``fd`` without waiting; ``False`` if another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:
            LOGGER.warning("cannot lock %s (%s); the run goes on unlocked: do not start a "
                           "second process on this directory", path, err)
        return True
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    LOGGER.warning("this platform has no file locks (fcntl, msvcrt); the run in %s goes on "
                   "unlocked: do not start a second process on it", path.parent)
    return True  # pragma: no cover


def _unlock(fd: int) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        elif sys.platform == "win32":  # pragma: no cover
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass
