"""How a message names an option: the library's keyword syntax, or the config key in the CLI.

A warning or piece of advice that tells the user to change an option must name it the way the
user sets it: ``samples='auto'`` when they call the library, ``outer.auto_samples = true`` when
they run ``hyperdiff run`` with a config. The command line enters :func:`config_syntax` around
every subcommand; messages call :func:`option` with both spellings.

>>> option("samples='auto'", "outer.auto_samples = true")
"samples='auto'"
>>> with config_syntax():
...     option("samples='auto'", "outer.auto_samples = true")
'outer.auto_samples = true'
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CONFIG_SYNTAX: ContextVar[bool] = ContextVar("hyperdiff_config_syntax", default=False)


@contextmanager
def config_syntax() -> Iterator[None]:
    """Within this block, :func:`option` returns the config-key spelling."""
    token = _CONFIG_SYNTAX.set(True)
    try:
        yield
    finally:
        _CONFIG_SYNTAX.reset(token)


def option(library: str, config: str) -> str:
    """``config`` inside :func:`config_syntax` (the CLI), else ``library``."""
    return config if _CONFIG_SYNTAX.get() else library


__all__ = ["config_syntax", "option"]
