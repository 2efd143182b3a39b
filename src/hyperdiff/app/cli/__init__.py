"""The ``hyperdiff`` command line: one module per subcommand.

A subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status). Adding a subcommand is one module and one line in
:data:`COMMANDS`. Bad input (:class:`~hyperdiff.errors.HyperdiffError`) prints one message and
exits with status 2; a run that diverges for good exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, str] = {
    "run": "hyperdiff.app.cli.run",
    "tasks": "hyperdiff.app.cli.tasks",
    "plot": "hyperdiff.app.cli.plot",
    "check": "hyperdiff.app.cli.check",
    "compare": "hyperdiff.app.cli.compare",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperdiff",
        description="Gradient-based hyperparameter optimization: tune, inspect and plot runs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verbosity = argparse.ArgumentParser(add_help=False)  # every subcommand: -v / -q
    verbosity.add_argument("-v", "--verbose", action="count", default=0,
                           help="more messages (debug level)")
    verbosity.add_argument("-q", "--quiet", action="count", default=0,
                           help="fewer messages: -q warnings and errors only (and no progress "
                           "bar), -qq errors only")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP,
                                 parents=[verbosity])
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hyperdiff`` script; returns the exit status."""
    from hyperdiff.errors import HyperdiffError, NonFiniteError
    from hyperdiff.logs import configure, get_logger
    from hyperdiff.wording import config_syntax

    args = build_parser().parse_args(argv)
    configure(args.verbose - args.quiet)
    try:
        with config_syntax():  # advice names config keys, not library arguments
            return int(args.handler(args))
    except HyperdiffError as err:
        get_logger("cli").error("hyperdiff %s: error: %s", args.command, err)
        return 2
    except NonFiniteError as err:
        get_logger("cli").error("hyperdiff %s: failed: %s", args.command, err)
        return 1
    except BrokenPipeError:  # e.g. `hyperdiff run --print-config | head`
        sys.stdout = None  # type: ignore[assignment]
        return 0
    except OSError as err:  # a filesystem error that no module turned into a HyperdiffError
        from hyperdiff.app.rundir.files import ADVICE

        where = f" {err.filename}" if err.filename else ""
        advice = ADVICE.get(err.errno or -1, "check the file and its directory")
        get_logger("cli").error("hyperdiff %s: error: cannot use%s: %s; %s", args.command,
                                where, err.strerror or err, advice)
        return 2
    except KeyboardInterrupt as err:  # a run's note says where it stopped, and how to go on
        where = "".join(f" {note}" for note in getattr(err, "__notes__", []))
        get_logger("cli").error("hyperdiff %s: interrupted%s", args.command, where)
        return 130


__all__ = ["COMMANDS", "build_parser", "main"]
