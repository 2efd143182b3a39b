"""hyperdiff's messages through the stdlib :mod:`logging` module.

Every module logs to a child of the ``"hyperdiff"`` logger (``get_logger("driver")`` is
``logging.getLogger("hyperdiff.driver")``). The library installs no handler of its own (a
:class:`logging.NullHandler` only), so an application decides where messages go, as with any
well-behaved library; without configuration Python's last-resort handler still prints warnings
to stderr. The ``hyperdiff`` command calls :func:`configure` with its ``-v`` / ``-q`` count:

=========  =======  ===============================================
verbosity  level    shows
=========  =======  ===============================================
-2 (-qq)   ERROR    errors only
-1 (-q)    WARNING  warnings (low signal-to-noise, no selection split, ...)
0          INFO     progress messages (the default)
1 (-v)     DEBUG    per-step details
=========  =======  ===============================================
"""

from __future__ import annotations

import logging
import sys

ROOT = "hyperdiff"
logging.getLogger(ROOT).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """The logger ``hyperdiff.<name>``."""
    return logging.getLogger(f"{ROOT}.{name}")


class StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (so redirections and test captures work)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def level_for(verbosity: int) -> int:
    """``logging`` level of a ``-v`` count minus a ``-q`` count (see the module doc)."""
    return min(logging.ERROR, max(logging.DEBUG, logging.INFO - 10 * verbosity))


def configure(verbosity: int = 0) -> logging.Logger:
    """Send ``hyperdiff`` messages at :func:`level_for` ``(verbosity)`` and above to stderr, as
    plain lines (replaces the handler of an earlier call)."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        if isinstance(handler, StderrHandler):
            logger.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level_for(verbosity))
    return logger
