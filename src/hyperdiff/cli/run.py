"""``hyperdiff run [CONFIG.toml]``: tune a task and print an initial-vs-tuned table."""

from __future__ import annotations

import argparse
import sys

HELP = "tune hyperparameters (default: a built-in task) and print a result table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
    parser.add_argument("--task", help="built-in task (same as --set task.name=TASK)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides", help="override a config key, e.g. stop.max_steps=10")
    parser.add_argument("--out", help="run directory (default: runs/<task>-<date>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run (with its own config)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the built-in tasks are small, and "
                        "one thread is fastest and safe on a busy machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config with comments and exit")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import HyperdiffError
    from ..experiment import format_table, run_experiment

    overrides = list(args.overrides)
    if args.task:
        overrides.insert(0, f"task.name={args.task}")
    config = None
    if args.config or not args.resume:
        config = load_config(args.config, overrides)
    if args.print_config:
        print(config.to_toml(comments=True) if config else "(resuming: see RUN_DIR/config.toml)")
        return 0
    if args.threads < 1:
        raise HyperdiffError(f"run: --threads must be a positive int (got {args.threads})")
    import torch

    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    result = run_experiment(
        config, out=args.out, resume=args.resume, overrides=tuple(overrides),
        progress=False if args.quiet else None, log=log,
    )
    print(format_table(result))
    return 0
