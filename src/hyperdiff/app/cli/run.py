"""``hyperdiff run [CONFIG.toml]``: tune a task and print an initial-vs-tuned table."""

from __future__ import annotations

import argparse

from hyperdiff.app.cli.common import add_config_arguments, config_overrides, set_threads

HELP = "tune hyperparameters (default: a built-in task) and print a result table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", help="run directory (default: runs/<task>-<date>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run (with its own config; "
                        "--set stop.max_steps=N with a larger N extends a finished offline "
                        "run); refused if the task's code or data changed since it started")
    parser.add_argument("--from", dest="start_from", metavar="RUN_DIR",
                        help="start a new run at the tuned (best) values of a finished "
                        "offline run of the same task")
    parser.add_argument("--accept-changed-inputs", action="store_true",
                        help="with --resume: continue although the task's code or data "
                        "changed (recorded in the manifest and the result)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the built-in tasks are small, and "
                        "one thread is fastest and safe on a busy machine)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config with comments and exit")
    parser.add_argument("--markdown", action="store_true",
                        help="with --print-config: print the table of every config key (its "
                        "default, valid values and meaning) as markdown instead, as "
                        "docs/driver.md holds it, and exit")


def run(args: argparse.Namespace) -> int:
    from hyperdiff.app.config import load_config
    from hyperdiff.app.experiment import format_table, run_experiment
    from hyperdiff.tuner.distributed import is_root

    if args.markdown:
        return _print_table(args)
    overrides = config_overrides(args)
    config = None
    if args.config or not args.resume:
        config = load_config(args.config, overrides)
    if args.print_config:
        print(config.to_toml(comments=True) if config else "(resuming: see RUN_DIR/config.toml)")
        return 0
    set_threads("run", args.threads)
    result = run_experiment(
        config, out=args.out, resume=args.resume, overrides=tuple(overrides),
        progress=False if args.quiet else None,
        accept_changed_inputs=args.accept_changed_inputs, start_from=args.start_from,
    )
    if is_root():
        print(format_table(result))
    return 0


def _print_table(args: argparse.Namespace) -> int:
    """``--print-config --markdown``: the config keys' table (their declared defaults, so no
    other argument applies)."""
    from hyperdiff.app.config import config_table
    from hyperdiff.errors import HyperdiffError

    if not args.print_config:
        raise HyperdiffError("run: --markdown must be given with --print-config (got it alone)")
    print(config_table(), end="")
    return 0
